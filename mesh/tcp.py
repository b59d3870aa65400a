"""A TCP socket as a `mesh.stream.Endpoint`: an asyncio Protocol, so each chunk costs one call.

Back-pressure: when this socket's send buffer passes the transport's high-water mark, asyncio
calls `pause_writing`, which pauses the joined peer's reading; `resume_writing` resumes it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from mesh.stream import Endpoint, EndpointBase

HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18


class TcpEndpoint(EndpointBase, asyncio.Protocol):
    def __init__(self, on_made: Callable[[TcpEndpoint], None] | None = None) -> None:
        super().__init__()
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._eof_in = False
        self._eof_out = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_made is not None:
            self._on_made(self)  # e.g. a listener deciding where this connection goes

    def data_received(self, data: bytes) -> None:
        self._recv += len(data)
        if self._peer is not None:
            self._peer.write(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        self._eof_in = True
        self._close_if_both_done()
        if self._peer is not None:
            self._peer.write_eof()
        else:
            self._early_eof = True
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._peer is not None:
            self._peer.abort()
        if not self._done.done():
            self._done.set_result(None)

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.resume_reading()

    # -- Endpoint --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._sent += len(data)
            self.transport.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self._eof_out = True
        if t.can_write_eof():
            t.write_eof()
            self._close_if_both_done()
        else:
            t.close()

    def _close_if_both_done(self) -> None:
        """Half-closed both ways: close (asyncio flushes what is buffered first)."""
        if self._eof_in and self._eof_out and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def join(a: Endpoint, b: Endpoint) -> None:
    """Splice two endpoints back to back."""
    a.join(b)
    b.join(a)
