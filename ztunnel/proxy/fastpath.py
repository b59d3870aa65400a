"""The same-node fast path: after ztunnel has authorized a connection between two pods on this
node that it splices in plaintext (a passthrough, or a local delivery between two meshed pods:
`ztunnel.proxy.local`), both legs of its splice go into the sockhash (`bpf.fastpath`), and the
kernel sends each leg's received bytes straight out of the other leg.

What stays in user space, so nothing changes for policy or telemetry: the decision (made
before, exactly as on the slow path), end of stream (a FIN is not data; the verdict never
sees it: ztunnel still reads each leg and half-closes the partner, after the kernel has handed
over every byte it redirected), the close (aborting the two sockets takes them out of the
sockhash), and the byte counts (the verdict counts what it redirects; added to the endpoints'
counters at close, so the flow record and access log are as before).

Bytes the verdict passes instead of redirecting (the partner is not paired yet or has gone)
reach ztunnel's reader and are forwarded as on the slow path. The one order hazard is at
pairing: bytes from the dialled leg that arrived after it entered the sockhash but before its
partner did. When ztunnel sees such bytes, it unpairs that direction (everything after them
then also comes through user space, in order); had the kernel already redirected later bytes
past them, the connection is reset rather than delivered out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Coroutine
from pathlib import Path

from bpf.fastpath import FastPathMaps, cookie, pin_dir
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting

log = logging.getLogger("ztunnel.fastpath")

_TCP_INFO_LEN = 136
_BYTES_ACKED = 120  # struct tcp_info: tcpi_bytes_acked (u64), then tcpi_bytes_received
DRAIN_TIMEOUT = 10.0  # how long an end of stream waits for the kernel's redirected bytes
_READ_OUT_MAX = 4 << 20  # per round: a peer that never pauses must not hold the loop
_ENGAGE_TIMEOUT = 2.0  # userspace's own writes must be out before the kernel takes over


def _tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(acked, received) from TCP_INFO; both count SYN and FIN as one byte each."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED)
    return int(acked), int(received)


def _queued(sock: socket.socket, req: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), req, buf)
    return int(struct.unpack("=i", buf)[0])


def _written(sock: socket.socket) -> int:
    """Bytes ever put into this socket's send queue: acknowledged plus still queued."""
    return _tcp_bytes(sock)[0] + _queued(sock, termios.TIOCOUTQ)


def _taken(sock: socket.socket) -> int:
    """Bytes this socket has received that someone (ztunnel or the kernel) has taken off its
    receive queue, counted from the same origin as later TCP_INFO reads."""
    return _tcp_bytes(sock)[1] - _queued(sock, termios.FIONREAD)


def _read_out(ep: TcpEndpoint, t: asyncio.Transport) -> int:
    """Read `ep`'s socket to EAGAIN, handing the bytes on as its reader would; -1 at EOF (left
    for the transport's own reader to see when it resumes)."""
    fd = t.get_extra_info("socket").fileno()
    n = 0
    while n < _READ_OUT_MAX:
        try:
            chunk = os.read(fd, 1 << 18)
        except (BlockingIOError, InterruptedError):
            return n
        if not chunk:
            return -1
        n += len(chunk)
        ep.data_received(chunk)
    return n


class _Leg:
    """One direction: bytes received on socket `inp` (cookie `c`) go out of `dst` (socket
    `out`)."""

    __slots__ = ("base", "c", "dst", "inp", "out", "paired", "recv_base", "user_bytes")

    def __init__(self, c: int, inp: socket.socket, dst: TcpEndpoint, out: socket.socket) -> None:
        self.c = c
        self.inp = inp
        self.dst = dst
        self.out = out
        self.base = _written(out)
        self.recv_base = _taken(inp)
        self.paired = True
        self.user_bytes = 0  # what user space wrote to `dst` after pairing


async def _drained(maps: FastPathMaps, leg: _Leg) -> None:
    """Wait until every byte `leg` received before its FIN has been through the verdict and
    every byte redirected is in the partner's send queue: a FIN (or close) before that would
    cut them off (the kernel's own send of redirected bytes then fails with EPIPE)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT
    delay = 0.0005
    t = leg.dst.transport
    while t is not None and not t.is_closing():
        try:
            want = maps.redirected(leg.c) + leg.user_bytes
            got = _tcp_bytes(leg.inp)[1] - leg.recv_base - 1  # the FIN counts one
            if want >= got and _written(leg.out) - leg.base >= want:
                return
        except (OSError, ValueError):  # a socket already closed (uvloop: fd -1)
            return
        if loop.time() > deadline:
            log.warning("fast path: end of stream after %.0f s without the kernel handing "
                        "over every byte", DRAIN_TIMEOUT)  # fmt: skip
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


def _state(sock: socket.socket) -> tuple[int, int]:
    """(TCP state, pending socket error) without reading: a paired socket is never read."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0], sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _has_input(sock: socket.socket) -> bool:
    """Bytes the verdict passed to user space (the pairing race): peeked, left in place."""
    fd = sock.fileno()
    if fd < 0:
        return False
    s = socket.socket(fileno=fd)
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
    finally:
        s.detach()


def _unwatch(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    loop.remove_reader(fd)
    os.close(fd)


_WATCH_BACKSTOP = 1.0  # s: a wakeup missed is noticed by then
_TCP_CLOSE = 7
_FIN_SEEN = frozenset({6, 7, 8, 9, 11})  # TIME_WAIT CLOSE CLOSE_WAIT LAST_ACK CLOSING


class _Gate:
    """Stands between a paired leg and its partner's endpoint: passes writes on (after
    unpairing the direction, see the module docstring), and holds an end of stream until the
    kernel has handed the partner every byte it redirected."""

    def __init__(self, pair: _Pair, leg: _Leg) -> None:
        self.pair = pair
        self.leg = leg

    def join(self, peer: Endpoint) -> None:
        raise RuntimeError("a fast-path gate is never joined")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        leg = self.leg
        if leg.paired:
            leg.paired = False
            early = self.pair.maps.forget(leg.c)
            self.pair.moved[leg.c] = early
            if early:
                log.warning("fast path: bytes arrived while pairing and later ones were "
                            "already redirected; resetting the connection")  # fmt: skip
                self.pair.abort()
                return
        leg.user_bytes += len(data)
        leg.dst.write(data)

    def write_eof(self) -> None:
        if not self.leg.paired:
            self.leg.dst.write_eof()
            return
        self.pair.spawn(self._eof_after_drain())

    async def _eof_after_drain(self) -> None:
        await _drained(self.pair.maps, self.leg)
        self.leg.dst.write_eof()

    def abort(self) -> None:
        self.leg.dst.abort()

    def _reads_own(self) -> bool:
        """Back-pressure may move the partner's reading only while ztunnel reads it (its
        direction unpaired): a paired socket's transport stays paused for good."""
        other = self.pair.legs[1] if self.leg is self.pair.legs[0] else self.pair.legs[0]
        return not other.paired

    def pause_reading(self) -> None:
        if self._reads_own():
            self.leg.dst.pause_reading()

    def resume_reading(self) -> None:
        if self._reads_own():
            self.leg.dst.resume_reading()

    @property
    def done(self) -> asyncio.Future[None]:
        return self.leg.dst.done

    @property
    def bytes_received(self) -> int:
        return self.leg.dst.bytes_received

    @property
    def bytes_sent(self) -> int:
        return self.leg.dst.bytes_sent


class _Pair:
    def __init__(self, maps: FastPathMaps, down: TcpEndpoint, up: TcpEndpoint) -> None:
        self.maps = maps
        self.down = down
        self.up = up
        self.tasks: set[asyncio.Task[None]] = set()
        self.moved: dict[int, int] = {}  # cookie -> bytes redirected, once unpaired
        self.legs: list[_Leg] = []

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def abort(self) -> None:
        self.down.abort()
        self.up.abort()

    def unpair(self, leg: _Leg, ep: TcpEndpoint) -> bool:
        """The direction from `ep` goes back to user space; False (and the connection reset)
        when the kernel had already sent later bytes past the ones waiting for ztunnel."""
        leg.paired = False
        self.moved[leg.c] = early = self.maps.forget(leg.c)
        if early and _has_input(leg.inp):
            log.warning("fast path: bytes arrived while pairing and later ones were already "
                        "redirected; resetting the connection")  # fmt: skip
            self.abort()
            return False
        ep.resume_reading()
        return True

    async def watch(self) -> None:
        """Paired sockets are not read by ztunnel (a read would race the verdict), so their
        end is watched here: a FIN is handed on once the bytes before it are out, a reset
        resets the partner, as the slow path's reader would.

        Woken by the socket's own readiness (a FIN or reset wakes pollers; the bytes the
        verdict takes do not) through a duplicate of its fd, since the transport owns the
        original; a slow timer backs it up. Bytes passed to user space instead (the partner
        has gone) send that direction back to the transport's reader."""
        eps = (self.down, self.up)
        for leg, ep in zip(self.legs, eps, strict=True):
            if _has_input(leg.inp) and not self.unpair(leg, ep):
                return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        watched: dict[int, int] = {}  # leg index -> our duplicate fd
        try:
            for i, leg in enumerate(self.legs):
                if leg.paired:
                    watched[i] = os.dup(leg.inp.fileno())
                    loop.add_reader(watched[i], wake.set)
            while watched:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), _WATCH_BACKSTOP)
                wake.clear()
                for i in list(watched):
                    leg, ep = self.legs[i], eps[i]
                    t = ep.transport
                    if t is None or t.is_closing():
                        return
                    try:
                        state, err = _state(leg.inp)
                    except (OSError, ValueError):
                        return  # closed under us: the endpoints' own ends finish the splice
                    if state == _TCP_CLOSE and err:
                        self.abort()  # reset (or failed): the partner is reset too
                        return
                    if state in _FIN_SEEN:
                        _unwatch(loop, watched.pop(i))
                        await _drained(self.maps, leg)
                        ep.eof_received()
                    elif _has_input(leg.inp):
                        _unwatch(loop, watched.pop(i))
                        if not self.unpair(leg, ep):
                            return
        finally:
            for fd in watched.values():
                _unwatch(loop, fd)

    def settle(self) -> None:
        """Closed: unpair what is still paired and count what the kernel moved."""
        for t in self.tasks:
            t.cancel()
        down_c, up_c = self.legs[0].c, self.legs[1].c
        for leg in self.legs:
            if leg.paired:
                leg.paired = False
                try:
                    self.moved[leg.c] = self.maps.forget(leg.c)
                except OSError:
                    self.moved[leg.c] = 0
        from_down, from_up = self.moved.get(down_c, 0), self.moved.get(up_c, 0)
        self.down.count_offloaded(from_down, from_up)
        self.up.count_offloaded(from_up, from_down)


class FastPath:
    """ztunnel's side of the fast path: one per process, over the pinned maps."""

    def __init__(self, maps: FastPathMaps) -> None:
        self.maps = maps
        self.engaged = 0  # connections paired (admin/tests)
        self.fallbacks = 0
        self._refusal_logged = False

    def dump(self) -> dict[str, object]:
        """For the admin status: is it on, and how often did it pair or fall back."""
        return {"mode": "on", "engaged": self.engaged, "fallbacks": self.fallbacks}

    async def splice(self, down: TcpEndpoint, up: TcpEndpoint, acct: Accounting) -> None:
        """`node.splice`, with the legs paired in the kernel when it accepts them."""
        acct.connected()
        down.pause_reading()
        up.pause_reading()
        down.join(up)  # what arrived before the dial completed goes out first, from here
        up.join(down)
        pair: _Pair | None = None
        try:
            pair = await self._engage(down, up)
        finally:
            if pair is None:
                down.resume_reading()
                up.resume_reading()
        try:
            if pair is not None:
                pair.spawn(pair.watch())
            await asyncio.gather(down.done, up.done)
        finally:
            if pair is not None:
                pair.settle()
            acct.finished(down)

    async def _engage(self, down: TcpEndpoint, up: TcpEndpoint) -> _Pair | None:
        """Pair the legs once nothing of theirs is half-read or unsent in user space.

        The kernel's verdict takes whole packets off the receive queue, including one ztunnel
        has read part of (the part would then be sent twice; seen on 6.18): so each leg is
        read to EAGAIN (what is read goes out through user space) and its partner's buffer
        emptied, until a round finds nothing, and only then, with no await in between, are
        both legs paired. What arrives meanwhile waits, whole, for the verdict."""
        td, tu = down.transport, up.transport
        if td is None or tu is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ENGAGE_TIMEOUT
        while True:
            if td.is_closing() or tu.is_closing() or loop.time() > deadline:
                return None  # closing, or a slow reader: stay in user space
            if td.get_write_buffer_size() or tu.get_write_buffer_size():
                await asyncio.sleep(0.001)
                continue
            moved = 0
            for ep, t in ((down, td), (up, tu)):
                n = _read_out(ep, t)
                if n < 0:
                    return None  # end of stream already: nothing left worth pairing
                moved += n
            if moved == 0:
                break
        sd: socket.socket = td.get_extra_info("socket")
        su: socket.socket = tu.get_extra_info("socket")
        cd = cu = 0
        try:
            cd, cu = cookie(sd), cookie(su)
            pair = _Pair(self.maps, down, up)
            pair.legs = [_Leg(cd, sd, up, su), _Leg(cu, su, down, sd)]
            # partners first, then the dialled leg, then the accepted one: bytes from pod A
            # always find pod B's socket in the map (see the module docstring for pod B's)
            self.maps.set_peer(cd, cu)
            self.maps.set_peer(cu, cd)
            self.maps.add_socket(cu, su)
            self.maps.add_socket(cd, sd)
            # bytes queued before pairing wait for the next arrival: make the kernel look now
            for s in (sd, su):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError as exc:
            self.fallbacks += 1
            for c in (cd, cu):
                if c:
                    with contextlib.suppress(OSError):
                        self.maps.forget(c)
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning("fast path refused by the kernel (%s); such connections stay "
                            "in user space", exc)  # fmt: skip
            return None
        down.join(_Gate(pair, pair.legs[0]))
        up.join(_Gate(pair, pair.legs[1]))
        self.engaged += 1
        return pair


FASTPATH_MODES = ("auto", "on", "off")


def open_fastpath(mode: str, pin_root: str) -> FastPath | None:
    """`--fastpath`: compile and pin the verdict in a child (as the redirect loader does: LLVM
    never enters ztunnel) and open its maps, or refuse to start without it (`on`); `off` never
    pairs.

    `auto` is a fixed rule, not a start-up timing: user space. Measured on this project's
    kernel (6.18, `python -m benchmarks.fastpath_bench`, README), the verdict's redirect to
    the partner's egress carries bulk at 0.4-0.6x of ztunnel's own splice for 1.3-1.9x the
    host CPU per GiB, and gains only small-request latency (p50 0.67-0.77x). A start-up
    timing inside ztunnel's process was tried and disagreed with that (it put both at
    parity, its sender and receiver sharing the interpreter with the relay) and flipped from
    run to run; a wrong pick costs every same-node connection for the process's life.
    Local delivery (meshed same-node pairs) did not change the verdict: bulk at 0.76x of user
    space alone (`fastpath_bench --hbone`) and 0.90-1.08x in the lab (`meshctl bench`'s
    same-node modes), while p50 (0.6-0.9x) and ztunnel CPU per request (0.2-0.4x) improve:
    what `--fastpath on` is for. `auto` also keeps BCC's compile out of every start."""
    if mode != "on":
        if mode == "auto":
            log.info(
                "same-node fast path off (auto: user space is faster on bulk here; "
                "--fastpath on pairs same-node splices in the kernel)"
            )
        return None
    from bpf.loader import BpfUnavailable

    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "bpf.fastpath", "load", "--pin-root", pin_root],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if res.returncode != 0:
            lines = res.stderr.strip().splitlines()
            raise BpfUnavailable(f"fast path: {lines[-1] if lines else 'loader failed'}")
        fast = FastPath(FastPathMaps.open_pinned(pin_root))
    except (BpfUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        raise BpfUnavailable(f"--fastpath on: {exc}") from None
    log.info("same-node fast path on (pins %s)", pin_dir(pin_root))
    return fast
