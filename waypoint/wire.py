"""What the waypoint's HTTP codecs share: message heads, streaming bodies, and the wire.

Every HTTP connection the waypoint speaks (downstream HTTP/1.1 or HTTP/2 inside an HBONE
CONNECT stream, upstream HTTP/1.1 or HTTP/2 inside another) is a `WireConn`: the peer
`mesh.stream.Endpoint` of the byte stream that carries it. Bytes arrive by callback and are
parsed at once; output goes out with `wire.write`, and the wire's back-pressure arrives as
`pause_reading`/`resume_reading` calls, which writers observe through `drain()`.

Bodies are never held whole: a `Body` is a bounded queue of chunks between the callback that
parses them and the coroutine that forwards them. Past `HIGH_WATER` buffered bytes the
producer is told to stop (HTTP/1.1: pause the wire; HTTP/2: withhold flow-control credit
until the consumer has taken the bytes), so a slow reader on one side slows the sender on the
other instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.stream import Endpoint, EndpointState

Headers = list[tuple[str, str]]

HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
MAX_CHUNK = 1 << 20  # what one Body.read joins at most

# Hop-by-hop headers (RFC 9110 7.6.1) never cross the proxy; framing headers are re-made by
# whichever codec writes the message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "host",
    }
)


class StreamReset(Exception):
    """The peer reset the stream or the connection died before the message ended."""


class UpstreamProtocolError(StreamReset):
    """The backend's response could not be framed safely (a smuggling attempt or a broken
    server): answered 502, never retried on the same terms, never forwarded."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # path with query
    authority: str
    headers: Headers  # lower-case names, no pseudo-headers, no hop-by-hop
    scheme: str = "http"
    te_trailers: bool = False  # the client accepts trailers (gRPC always does)
    content_length: int | None = None
    end_stream: bool = False  # the request has no body at all


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers  # lower-case names, no hop-by-hop (content-length kept when known)
    end_stream: bool = False  # no body follows (HEAD, 204, 304, a gRPC trailers-only answer)


def end_to_end(headers: Headers) -> Headers:
    """Drop hop-by-hop headers and any header the Connection header names."""
    named = {t.strip() for k, v in headers if k == "connection" for t in v.lower().split(",") if t}
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(k, v) for k, v in headers if k not in drop]


def content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == "content-length":
            v = v.strip()
            if not v.isdigit():
                raise ValueError(f"bad content-length {v!r}")
            return int(v)
    return None


class Body:
    """A bounded queue of body chunks and, at the end, trailers.

    `feed`/`end`/`fail` are called by a parser (callbacks); `read` by the forwarding
    coroutine. `on_consumed(n)` tells the producer `n` bytes left the queue, which is where it
    resumes reading (HTTP/1.1) or returns flow-control credit (HTTP/2)."""

    __slots__ = (
        "_chunks",
        "_error",
        "_waiter",
        "buffered",
        "ended",
        "on_consumed",
        "received",
        "trailers",
    )

    def __init__(self, on_consumed: Callable[[int], None] | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.on_consumed = on_consumed
        self.buffered = 0
        self.received = 0
        self.ended = False
        self.trailers: Headers | None = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def feed(self, data: bytes) -> None:
        if self.ended or self._error is not None or not data:
            return
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._wake()

    def end(self, trailers: Headers | None = None) -> None:
        if self.ended or self._error is not None:
            return
        self.ended = True
        self.trailers = trailers or None
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.ended or self._error is not None:
            return
        self._error = exc
        self._wake()

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def over_high_water(self) -> bool:
        return self.buffered > HIGH_WATER

    def read_nowait(self) -> bytes:
        """What is buffered right now (b"" when nothing is), without waiting: lets a writer
        put a response head and the first body bytes in one write."""
        if not self._chunks or self._error is not None:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.buffered -= len(data)
        if self.on_consumed is not None:
            self.on_consumed(len(data))
        return data

    async def read(self) -> bytes:
        """The next bytes (several queued chunks joined, up to MAX_CHUNK); b"" at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks.popleft()
        if chunks and len(data) < MAX_CHUNK:
            parts = [data]
            n = len(data)
            while chunks and n + len(chunks[0]) <= MAX_CHUNK:
                c = chunks.popleft()
                parts.append(c)
                n += len(c)
            data = b"".join(parts)
        self.buffered -= len(data)
        if self.on_consumed is not None:
            self.on_consumed(len(data))
        return data


class ServerExchange(Protocol):
    """One downstream request, as the handler sees it, whatever the HTTP version."""

    head: RequestHead
    body: Body
    protocol: str  # "http/1.1" | "h2"

    async def send_head(
        self, head: ResponseHead, first: bytes = b"", *, last: bool = False
    ) -> None:
        """The response head and, when already at hand, the first body bytes (one write).
        With `last`, `first` is all of the body and the response ends with it, as `finish()`
        would end it, in the same write (HTTP/2: END_STREAM on that DATA frame instead of an
        empty one after it)."""

    async def send_data(self, data: bytes) -> None: ...

    async def finish(self, trailers: Headers | None = None) -> None: ...

    def reset(self) -> None: ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def head_sent(self) -> bool: ...


class ClientExchange(Protocol):
    """One upstream request in flight: body out, response in."""

    response: asyncio.Future[ResponseHead]
    body: Body

    async def send_data(self, data: bytes) -> None: ...

    async def finish(self, trailers: Headers | None = None) -> None: ...

    def reset(self) -> None: ...

    def release(self) -> None:
        """The caller is done with this exchange (its connection may be reused)."""


class ExchangeState:
    """What both server exchanges (HTTP/1.1 and HTTP/2) report the same way: bytes of body
    sent and whether the response head went out (a retry is possible only before it)."""

    _sent: int
    _head_sent: bool

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def head_sent(self) -> bool:
        return self._head_sent


class WireConn(EndpointState):
    """The peer Endpoint of the byte stream an HTTP connection runs on.

    Subclasses implement `data_from_wire` / `eof_from_wire` / `wire_lost`. `drain()` waits
    while the wire has asked us to stop writing."""

    def __init__(self) -> None:
        super().__init__()
        self.wire: Endpoint | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    # -- Endpoint (the wire calls these) ---------------------------------------------------

    def join(self, peer: Endpoint) -> None:
        self.wire = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._recv += len(data)
        self.data_from_wire(bytes(data) if not isinstance(data, bytes) else data)

    def write_eof(self) -> None:
        self.eof_from_wire()

    def abort(self) -> None:
        self.wire_lost()

    def pause_reading(self) -> None:
        self._writable.clear()

    def resume_reading(self) -> None:
        self._writable.set()

    # -- for subclasses --------------------------------------------------------------------

    def _mark_lost(self) -> None:
        """The wire is gone for good: writers waiting in `drain()` wake, `done` fires."""
        self.closed = True
        self._writable.set()
        if not self._done.done():
            self._done.set_result(None)

    def data_from_wire(self, data: bytes) -> None:
        raise NotImplementedError

    def eof_from_wire(self) -> None:
        raise NotImplementedError

    def wire_lost(self) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        if self.wire is not None and not self.closed and data:
            self._sent += len(data)
            self.wire.write(data)

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()

    def close_wire(self, *, abort: bool = False) -> None:
        """Finish our side of the wire (END_STREAM / FIN) or reset it."""
        if self.closed:
            return
        self.closed = True
        self._writable.set()  # nobody may wait for a wire that is gone
        if self.wire is not None:
            if abort:
                self.wire.abort()
            else:
                self.wire.write_eof()
        if not self._done.done():
            self._done.set_result(None)


@dataclass(slots=True)
class Recorded:
    """A request body kept while it is small enough to send again (retries, mirrors)."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False
    complete: bool = False
    trailers: Headers | None = None


class ReplayableBody:
    """Reads the downstream body once, keeps up to `limit` bytes of it, and lets each attempt
    read it from the start. Past the limit a retry is no longer possible (`replayable`)."""

    def __init__(self, source: Body, limit: int = 1 << 20) -> None:
        self.source = source
        self.limit = limit
        self.rec = Recorded()

    @property
    def replayable(self) -> bool:
        return not self.rec.overflow

    async def _pull(self) -> bool:
        """One more chunk from the source into the record; False at the end."""
        data = await self.source.read()
        if not data:
            self.rec.complete = True
            self.rec.trailers = self.source.trailers
            return False
        self.rec.size += len(data)
        if self.rec.size > self.limit:
            self.rec.overflow = True
            self.rec.chunks.clear()
        self._last = data
        if not self.rec.overflow:
            self.rec.chunks.append(data)
        return True

    async def pump(self, out: ClientExchange) -> None:
        """Send the whole body (recorded part first) and trailers to one attempt."""
        if self.rec.overflow:
            raise StreamReset("request body already streamed; cannot send it again")
        for c in list(self.rec.chunks):
            await out.send_data(c)
        while not self.rec.complete:
            if not await self._pull():
                break
            await out.send_data(self.rec.chunks[-1] if not self.rec.overflow else self._last)
        await out.finish(self.rec.trailers)

    async def whole(self) -> bytes | None:
        """The complete body once it has been read (for mirrors), or None past the limit."""
        return None if self.rec.overflow or not self.rec.complete else b"".join(self.rec.chunks)
