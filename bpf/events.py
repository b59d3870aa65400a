"""Kernel-side drops, read without BCC: the connect4 program's counters map and ring buffer.

Why plain bpf(2) and mmap, like `bpf.syscall` does for programs: ztunnel must never hold LLVM
(BCC's ~100 MiB). Both maps are pinned under the node's pin root, so drops that happen while
ztunnel is down (the pod's connect refused with EPERM because nobody listens) stay there, and
a ztunnel that starts again reads them (`DropReader.drain`).

The ring buffer's layout is the kernel's (kernel/bpf/ringbuf.c): page 0 is the consumer
position (ours to write), page 1 the producer position, then the data area mapped twice in a
row, so a record that wraps reads as one slice. Each record is an 8-byte header (length with
BUSY/DISCARD bits, page offset) and the sample, padded to 8 bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from bpf import syscall

REASON_POLICY = 1
REASON_NO_ZTUNNEL = 2
REASONS = {REASON_POLICY: "policy-denied", REASON_NO_ZTUNNEL: "ztunnel-unavailable"}

_EVENT = struct.Struct("<QQQ4sHHII")  # struct drop_event in redirect.bpf.c
_COUNT_KEY = struct.Struct("<II")  # struct drop_key
_BUSY = 1 << 31
_DISCARD = 1 << 30
_BPF_MAP_TYPE_RINGBUF = 27


@dataclass(frozen=True, slots=True)
class DropEvent:
    """One connect the kernel refused."""

    time: float  # UNIX time of the drop
    netns_cookie: int  # the pod's network namespace
    cgroup_id: int  # the cgroup of the process that called connect()
    dst_ip: str
    dst_port: int
    reason: str  # "policy-denied" | "ztunnel-unavailable" | "unknown(<n>)"
    policy_id: int  # the denying policy's id (bpf.policy.policy_id), 0 for other reasons


def decode(sample: bytes, boot_offset: float | None = None) -> DropEvent:
    """One ring buffer sample as an event; `boot_offset` (wall minus boot clock) turns the
    kernel's boot-clock stamp into UNIX time."""
    if len(sample) < _EVENT.size:
        raise ValueError(f"drop event of {len(sample)} bytes, expected {_EVENT.size}")
    boot_ns, netns, cgroup, ip, port, reason, policy, _ = _EVENT.unpack_from(sample)
    if boot_offset is None:
        boot_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return DropEvent(
        time=boot_offset + boot_ns / 1e9,
        netns_cookie=netns,
        cgroup_id=cgroup,
        dst_ip=".".join(str(b) for b in ip),
        dst_port=port,
        reason=REASONS.get(reason, f"unknown({reason})"),
        policy_id=policy,
    )


class RingReader:
    """Consumer side of one BPF ring buffer map, by fd (the reader owns and closes it)."""

    def __init__(self, fd: int) -> None:
        mtype, _, _, size = syscall.map_info(fd)
        if mtype != _BPF_MAP_TYPE_RINGBUF:
            os.close(fd)
            raise ValueError(f"map type {mtype} is not a ring buffer")
        self.fd, self.size, page = fd, size, mmap.PAGESIZE
        try:
            self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        self._data = page  # where the data area starts in _prod

    def read(self, limit: int = 1 << 20) -> list[bytes]:
        """The samples committed since the last read, oldest first (at most `limit`)."""
        out: list[bytes] = []
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        mask = self.size - 1
        while cons < prod and len(out) < limit:
            at = self._data + (cons & mask)
            hdr = struct.unpack_from("<I", self._prod, at)[0]
            if hdr & _BUSY:
                break  # reserved, not yet committed
            length = hdr & ~(_BUSY | _DISCARD)
            if not hdr & _DISCARD:
                out.append(bytes(self._prod[at + 8 : at + 8 + length]))
            cons += (length + 8 + 7) & ~7
            struct.pack_into("<Q", self._cons, 0, cons)
        return out

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
        os.close(self.fd)


class DropReader:
    """The node's drop counters and events, from the maps pinned under `pin_root`."""

    def __init__(self, pin_root: str) -> None:
        self.counts_fd = syscall.obj_get(os.path.join(pin_root, "drop_counts"))
        try:
            self.ring = RingReader(syscall.obj_get(os.path.join(pin_root, "drop_events")))
        except BaseException:
            os.close(self.counts_fd)
            raise

    def drain(self, limit: int = 1 << 20) -> list[DropEvent]:
        """Every event recorded since the last drain (also those from before this process)."""
        offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return [decode(s, offset) for s in self.ring.read(limit)]

    def counts(self) -> dict[tuple[str, int], int]:
        """Drops so far by (reason, policy id), since the maps were first pinned."""
        out: dict[tuple[str, int], int] = {}
        for key in syscall.map_keys(self.counts_fd, _COUNT_KEY.size):
            raw = syscall.map_lookup(self.counts_fd, key, 8)
            if raw is None:
                continue
            reason, policy = _COUNT_KEY.unpack(key)
            name = REASONS.get(reason, f"unknown({reason})")
            out[(name, policy)] = out.get((name, policy), 0) + struct.unpack("<Q", raw)[0]
        return out

    def close(self) -> None:
        self.ring.close()
        os.close(self.counts_fd)

    def __enter__(self) -> DropReader:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
