"""Dialing and serving kTLS connections: `create_connection` and an `asyncio.AbstractServer`
that handshakes each accepted socket before its protocol sees a byte."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from mesh.ktls.errors import KtlsError
from mesh.ktls.handshake import KtlsContext
from mesh.ktls.session import client_handshake, server_handshake
from mesh.ktls.transport import KtlsTransport, _peername, transport_for

log = logging.getLogger("mesh.ktls")

# -- dialing and serving -------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 10.0


async def create_connection(
    protocol_factory: Callable[[], asyncio.Protocol],
    address: tuple[str, int],
    ctx: KtlsContext,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[KtlsTransport, asyncio.Protocol]:
    """TCP connect, TLS 1.3 handshake in user space, keys to the kernel, protocol attached."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(handshake_timeout):
            await loop.sock_connect(sock, address)
            session = await client_handshake(sock, ctx)
    except BaseException:
        sock.close()
        raise
    protocol = protocol_factory()
    return transport_for(loop, sock, protocol, session), protocol


class KtlsServer(asyncio.AbstractServer):
    """A listener whose accepted connections are handshaken and offloaded before the
    protocol sees them. It owns its accept loop and every handshake task it starts."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: KtlsContext | Callable[[], KtlsContext],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._ctx = ctx
        self._factory = protocol_factory
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = self._loop.create_future()
        self._accept = self._loop.create_task(self._accept_loop())
        self.handshake_failures = 0
        self.offloaded = 0  # connections whose records the kernel handles
        self.user_space = 0  # connections the kernel would not take (see `install`)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.done() else (self._sock,)

    async def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: back off, keep serving
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            task = self._loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self._timeout):
                # A provider is asked per connection: rotated certificates reach new
                # connections while live ones keep the keys they negotiated.
                ctx = self._ctx if isinstance(self._ctx, KtlsContext) else self._ctx()
                session = await server_handshake(conn, ctx)
        except (KtlsError, OSError, TimeoutError) as exc:
            self.handshake_failures += 1
            log.warning("ktls: handshake with %s failed: %s", _peername(conn), exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        if session.offloaded:
            self.offloaded += 1
        else:
            self.user_space += 1
        transport_for(self._loop, conn, self._factory(), session)

    def close(self) -> None:
        if self._closed.done():
            return
        self._accept.cancel()
        for t in list(self._tasks):
            t.cancel()
        self._sock.close()
        self._closed.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed.done()

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


async def start_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    ctx: KtlsContext | Callable[[], KtlsContext],
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> KtlsServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=False)
    sock.setblocking(False)
    return KtlsServer(sock, ctx, protocol_factory, timeout=handshake_timeout)
