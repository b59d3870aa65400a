"""The same-node fast path's kernel half: an sk_skb stream verdict on a sockhash of paired
sockets (`fastpath.bpf.c`).

As with the redirect programs, BCC compiles in a short-lived child (`python -m bpf.fastpath
load --pin-root DIR`), which loads the program, attaches it to the sockhash and pins program
and maps; ztunnel then only opens the pinned maps (`FastPathMaps`) and pairs sockets with
BPF_MAP_UPDATE_ELEM, so LLVM never stays resident in it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import struct
import sys
from pathlib import Path

from bpf import syscall
from bpf.loader import DEFAULT_PIN_ROOT, BpfUnavailable, import_bcc
from bpf.mounts import MountUnavailable, ensure_bpffs

_SRC = Path(__file__).with_name("fastpath.bpf.c")
PIN_NAMES = ("fastpath_prog", "fastpath_socks", "fastpath_peer")
SK_SKB_STREAM_VERDICT = 5  # enum bpf_attach_type
SO_COOKIE = 57
_LEG = struct.Struct("=QQ")  # struct fp_leg { u64 peer; u64 bytes; }
_KEY = struct.Struct("=Q")


def pin_dir(pin_root: str) -> str:
    return os.path.join(pin_root, "fastpath")


def load(pin_root: str = DEFAULT_PIN_ROOT) -> list[str]:
    """Compile, load, attach the verdict to the sockhash, pin all three; returns the mounts
    that had to be made first. Replaces older pins (a new version)."""
    bcc = import_bcc()
    actions = ensure_bpffs(pin_root)
    b = bcc.BPF(text=_SRC.read_bytes())
    fn = b.load_func(b"fastpath_verdict", bcc.BPFProgType.SK_SKB)
    from bcc.libbcc import lib  # type: ignore[import-not-found, unused-ignore]

    socks_fd = int(lib.bpf_table_fd(b.module, b"fp_socks"))
    peer_fd = int(lib.bpf_table_fd(b.module, b"fp_peer"))
    syscall.prog_attach(int(fn.fd), socks_fd, SK_SKB_STREAM_VERDICT)
    d = pin_dir(pin_root)
    os.makedirs(d, exist_ok=True)
    for name, fd in zip(PIN_NAMES, (int(fn.fd), socks_fd, peer_fd), strict=True):
        path = os.path.join(d, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        syscall.obj_pin(fd, path)
    b.cleanup()
    return actions


def unload(pin_root: str = DEFAULT_PIN_ROOT) -> None:
    """Unpin: the program and maps go once no process holds them (sockets leave with them)."""
    shutil.rmtree(pin_dir(pin_root), ignore_errors=True)


def cookie(sock: socket.socket) -> int:
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


class FastPathMaps:
    """ztunnel's handle on the pinned maps: pair two sockets, read and forget a pair."""

    def __init__(self, socks_fd: int, peer_fd: int) -> None:
        self.socks_fd = socks_fd
        self.peer_fd = peer_fd

    @classmethod
    def open_pinned(cls, pin_root: str = DEFAULT_PIN_ROOT) -> FastPathMaps:
        d = pin_dir(pin_root)
        fds: list[int] = []
        try:
            for name in PIN_NAMES[1:]:
                fds.append(syscall.obj_get(os.path.join(d, name)))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise BpfUnavailable(
                f"fast path not pinned under {d} ({exc.strerror}); "
                f"fix: python -m bpf.fastpath load --pin-root {pin_root}"
            ) from None
        return cls(fds[0], fds[1])

    def close(self) -> None:
        for fd in (self.socks_fd, self.peer_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def add_socket(self, c: int, sock: socket.socket) -> None:
        """Into the sockhash (the kernel refuses a socket that is not an established TCP one)."""
        syscall.map_update(self.socks_fd, _KEY.pack(c), struct.pack("=I", sock.fileno()))

    def set_peer(self, c: int, peer: int) -> None:
        syscall.map_update(self.peer_fd, _KEY.pack(c), _LEG.pack(peer, 0))

    def redirected(self, c: int) -> int:
        """Bytes the verdict has sent from socket `c` to its partner so far."""
        raw = syscall.map_lookup(self.peer_fd, _KEY.pack(c), _LEG.size)
        return 0 if raw is None else int(_LEG.unpack(raw)[1])

    def forget(self, c: int) -> int:
        """Unpair `c` (its bytes then go to userspace); returns what it had redirected."""
        n = self.redirected(c)
        syscall.map_delete(self.peer_fd, _KEY.pack(c))
        return n

    def in_sockhash(self) -> int:
        return len(syscall.map_keys(self.socks_fd, _KEY.size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpf.fastpath")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("load", "unload"):
        sp = sub.add_parser(cmd)
        sp.add_argument("--pin-root", default=DEFAULT_PIN_ROOT)
    args = p.parse_args(argv)
    if args.cmd == "unload":
        unload(args.pin_root)
        return 0
    try:
        for what in load(args.pin_root):
            print(f"bpf.fastpath: {what}", file=sys.stderr)
    except (BpfUnavailable, MountUnavailable, OSError) as exc:
        print(f"bpf.fastpath: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
