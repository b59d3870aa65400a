"""Protocols and a relay shared by the kTLS guest tests."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable


class Recorder(asyncio.Protocol):
    """Collects what arrives and how the connection ended."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.digest = hashlib.sha256()
        self.received = 0
        self.keep = True  # keep bytes (small tests) or only hash them (large transfers)
        self.eof = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.made = asyncio.get_running_loop().create_future()
        self.keep_open_on_eof = False
        self.on_data: Callable[[bytes], None] | None = None
        self._arrived = asyncio.Event()

    async def until(self, n: int) -> None:
        """Wait until `n` bytes in all have arrived (the caller bounds it with a timeout)."""
        while self.received < n:
            self._arrived.clear()
            await self._arrived.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.keep:
            self.data += data
        if self.on_data is not None:
            self.on_data(data)
        self._arrived.set()

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_exception(ConnectionError(f"lost before EOF: {exc}"))
            self.eof.exception()
        if not self.lost.done():
            self.lost.set_result(exc)


class Echo(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        super().eof_received()
        assert self.transport is not None
        self.transport.close()
        return True


class CorruptingRelay:
    """A TCP man in the middle that flips one byte of the server-to-client stream at
    `offset`: what a bit error or an attacker on the wire would do to a TLS record."""

    def __init__(self, upstream: tuple[str, int], offset: int) -> None:
        self.upstream = upstream
        self.offset = offset
        self.flipped = False
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _on_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.upstream)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipe(cr, uw, corrupt=False))
            tg.create_task(self._pipe(ur, cw, corrupt=True))

    async def _pipe(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, corrupt: bool
    ) -> None:
        seen = 0
        try:
            while data := await r.read(65536):
                if corrupt and not self.flipped and seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x40
                    data = bytes(buf)
                    self.flipped = True
                seen += len(data)
                w.write(data)
                await w.drain()
            w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            if r.at_eof():
                w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
