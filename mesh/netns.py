"""Sockets inside another network namespace, created from this process and thread.

ztunnel opens listeners and dials connections *inside* each enrolled pod's netns, so that the
pod's own addresses and routes apply, while the sockets still belong to ztunnel (its cgroup,
not the pod's: the pod's redirect programs never see them, so nothing loops). A socket keeps
the namespace it was created in for its whole life, so it is enough to switch this thread's
namespace around the `socket()` call and switch back at once: `setns` is per thread, touches
no other thread (the default executor keeps running in the node's namespace), and costs a few
microseconds, so it is done synchronously on the event loop thread.

Python 3.11 has no `os.setns` (3.12 does), hence the two-line ctypes binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Callable, Iterator

__all__ = ["NetNs", "NetNsError", "connect_in"]

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetNsError(OSError):
    """A namespace file that cannot be opened or entered; the message names the path."""


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetNsError(err, f"setns into {what}: {os.strerror(err)}")


class NetNs:
    """An open handle on a network namespace (e.g. `/var/run/netns/pod-a` or
    `/proc/<pid>/ns/net`). Holding the fd keeps the namespace alive and lets us enter it even
    after its bind mount is gone, so a pod deleted mid-connection cannot make us enter another.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetNsError(exc.errno, f"network namespace {path}: {exc.strerror}") from None
        st = os.fstat(self._fd)
        self.inode = st.st_ino
        # A plain file is not a namespace: setns would fail later with a confusing EINVAL.
        try:
            with self._entered():
                pass
        except NetNsError:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNs({self.path!r})"

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        if self._fd < 0:
            raise NetNsError(0, f"network namespace {self.path}: handle closed")
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._fd, self.path)
            try:
                yield
            finally:
                # Failing to return would leave the loop thread in the pod: nothing sane can
                # continue from there, so this error is allowed to propagate and kill us.
                _setns(home, "this thread's original namespace")
        finally:
            os.close(home)

    def run(self, fn: Callable[[], socket.socket]) -> socket.socket:
        """Call `fn` (which must only create sockets) inside the namespace."""
        with self._entered():
            return fn()

    def new_socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A new non-blocking socket that lives in this namespace."""
        sock = self.run(lambda: socket.socket(family, type))
        sock.setblocking(False)
        return sock

    def listen(self, host: str, port: int, backlog: int = 1024) -> socket.socket:
        """A bound, listening TCP socket in this namespace (bind happens after we are back:
        the socket already belongs to the namespace)."""
        sock = self.new_socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise NetNsError(
                exc.errno, f"listen on {host}:{port} in {self.path}: {exc.strerror}"
            ) from None
        return sock

    async def connect(
        self, host: str, port: int, *, connect_timeout: float | None = None
    ) -> socket.socket:
        """A TCP socket connected to `host:port` from inside this namespace."""
        sock = self.new_socket()
        try:
            async with asyncio.timeout(connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock


async def connect_in(
    netns: NetNs | None,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    *,
    connect_timeout: float | None = None,
) -> asyncio.Protocol:
    """Connect `factory()` to `host:port`, from `netns` when given, else from ours."""
    loop = asyncio.get_running_loop()
    if netns is None:
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(factory, host, port)
        return proto
    sock = await netns.connect(host, port, connect_timeout=connect_timeout)
    _, proto = await loop.create_connection(factory, sock=sock)
    return proto
