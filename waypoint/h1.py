"""HTTP/1.1 on a wire, both ends: `H1Server` (downstream) and `H1Client` (upstream).

httptools (llhttp) parses in callbacks as bytes arrive; bodies stream through `Body` queues
chunk by chunk, framed on output as Content-Length when the length is known and chunked
otherwise (with trailers, which gRPC-over-HTTP/1.1 bridges and some APIs use). Requests on
one connection are answered in order (pipelined ones wait in a queue; their bodies are bounded
like any other).

A request whose framing two parsers could read two ways (request smuggling: Content-Length
with Transfer-Encoding, several Content-Lengths, a coding other than exactly `chunked`, bad
chunk sizes, obs-fold, bare LF, HTTP/0.9) is answered 400 and the connection closed; it is
never forwarded, because the backend's parser might frame it differently from ours. llhttp in
strict mode refuses most of these; what it lets through (`gzip, chunked`, Transfer-Encoding
in HTTP/1.0, two Hosts, HTTP/0.9) is refused here before the request is queued. A head over
`Limits` is 431 (414 for the target), one that does not arrive in time 408.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from waypoint.limits import PROTOCOL_ERROR, TIMEOUT, Limits, OnRefused, Refusal
from waypoint.wire import (
    HIGH_WATER,
    LOW_WATER,
    Body,
    ExchangeState,
    Headers,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamProtocolError,
    WireConn,
    content_length,
    end_to_end,
)

log = logging.getLogger("waypoint.h1")

REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
DEFAULT_LIMITS = Limits()
MAX_QUEUED = 16  # pipelined requests waiting for their turn before we stop reading


def _no_body(status: int, method: str) -> bool:
    return method == "HEAD" or 100 <= status < 200 or status in (204, 304)


def _head_bytes(first: str, headers: Headers, extra: list[str]) -> bytes:
    parts = [first]
    parts.extend(f"{k}: {v}" for k, v in headers)
    parts.extend(extra)
    return ("\r\n".join(parts) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in trailers).encode("latin-1") + b"\r\n"


class HttpError(StreamReset):
    """A request refused before it is forwarded: the status to answer and why."""

    def __init__(self, status: int, reason: str, detail: str, flag: str = PROTOCOL_ERROR) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.flag = flag


class _Parse:
    """Collects httptools header callbacks (trailers too: llhttp reports them after the body)."""

    __slots__ = ("count", "head_bytes", "headers", "in_trailers", "limits", "trailers", "url")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.url = bytearray()
        self.headers: Headers = []
        self.trailers: Headers = []
        self.in_trailers = False
        self.head_bytes = 0
        self.count = 0
        self.limits = limits

    def header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF count as on the wire
        self.count += 1
        if self.head_bytes > self.limits.max_header_bytes:
            raise HttpError(431, "header_too_large", "header section too large")
        if self.count > self.limits.max_headers:
            raise HttpError(431, "too_many_headers", "too many header fields")
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        (self.trailers if self.in_trailers else self.headers).append(pair)


# ---------------------------------------------------------------------------------------------
# Downstream


class H1ServerExchange(ExchangeState):
    """One request on an HTTP/1.1 connection and the response being written for it."""

    protocol = "http/1.1"

    def __init__(self, conn: H1Server, head: RequestHead, keep_alive: bool, http10: bool) -> None:
        self.conn = conn
        self.head = head
        self.body = Body(conn._consumed)
        self.keep_alive = keep_alive
        self.http10 = http10
        self._head_sent = False
        self._chunked = False
        self._no_body = False
        self._sent = 0
        self.finished = False
        self.started = False  # the handler has it: from here on it may be forwarded
        self.refusal: Refusal | None = None  # set when the connection refused it mid-way

    async def send_head(
        self, head: ResponseHead, first: bytes = b"", *, last: bool = False
    ) -> None:
        if self.conn.error is not None:
            # The request turned out malformed (a bad chunk after the head): whatever the
            # backend answered belongs to a request it never fully got. The 400 goes instead.
            raise StreamReset(f"bad request: {self.conn.error.detail}")
        self._head_sent = True
        extra: list[str] = []
        hs = [(k, v) for k, v in head.headers if k != "content-length"]
        length = content_length(head.headers)
        self._no_body = _no_body(head.status, self.head.method)
        if self._no_body:
            if length is not None:
                extra.append(f"content-length: {length}")  # HEAD/304 keep the real length
            elif head.status not in (204, 304) and head.status >= 200:
                extra.append("content-length: 0")
        elif head.end_stream:
            extra.append("content-length: 0")
            self._no_body = True
        elif length is not None:
            extra.append(f"content-length: {length}")
        elif self.http10:
            self.keep_alive = False  # close-delimited
        else:
            self._chunked = True
            extra.append("transfer-encoding: chunked")
        if not self.body.ended:
            # The rest of an unread request body would be parsed as the next request.
            self.keep_alive = False
        if not self.keep_alive:
            extra.append("connection: close")
        reason = REASONS.get(head.status, "Status")
        out = _head_bytes(f"HTTP/1.1 {head.status} {reason}", hs, extra)
        if first and not self._no_body:
            self._sent += len(first)
            out += _chunk(first) if self._chunked else first
        if last:
            self.finished = True
            if self._chunked:
                out += _last_chunk(None)
        self.conn.send(out)
        await self.conn.drain()

    async def send_data(self, data: bytes) -> None:
        if self._no_body or not data:
            return
        self._sent += len(data)
        self.conn.send(_chunk(data) if self._chunked else data)
        await self.conn.drain()

    async def finish(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self._chunked:
            self.conn.send(_last_chunk(trailers))
        await self.conn.drain()

    def reset(self) -> None:
        self.finished = True
        self.keep_alive = False
        if self.conn.error is not None and not self._head_sent:
            self.refusal = self.conn.error
            self.conn.answer_refusal(self.conn.error)
            self.conn.close_wire()
            return
        self.conn.close_wire(abort=True)


Handler = Callable[["H1ServerExchange"], Awaitable[None]]


class H1Server(WireConn):
    """A downstream HTTP/1.1 connection: parses requests, runs `handler` for each in order."""

    def __init__(
        self,
        handler: Callable[[H1ServerExchange], Awaitable[None]],
        limits: Limits = DEFAULT_LIMITS,
        on_refused: OnRefused | None = None,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.limits = limits
        self.on_refused = on_refused
        self._parser = httptools.HttpRequestParser(self)
        self._p = _Parse(limits)
        self._cur: H1ServerExchange | None = None
        self._queue: deque[H1ServerExchange] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._eof = False
        self._paused = False
        self.error: Refusal | None = None
        self._answered = False
        self._task: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        # The first request's head must come within headers_timeout of the connection (a
        # client that connects and says nothing is a slowloris too); idle time is checked from
        # then on between requests. The deadline moves per request; the timer does not: it
        # is armed once and, when it fires early (an earlier head came in time), re-armed
        # for the deadline then current, so a request costs no timer of its own.
        self._head_deadline: float | None = self._last + limits.headers_timeout
        self._head_timer: asyncio.TimerHandle | None = loop.call_later(
            limits.headers_timeout, self._head_timeout
        )
        self._idle_timer: asyncio.TimerHandle | None = loop.call_later(
            limits.idle_timeout, self._idle_check
        )

    # -- wire ------------------------------------------------------------------------------

    def data_from_wire(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._last = asyncio.get_running_loop().time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad(HttpError(400, "upgrade", "protocol upgrade is not supported"))
        except (httptools.HttpParserError, StreamReset, ValueError) as exc:
            cause = exc.__context__ if isinstance(exc.__context__, StreamReset) else exc
            if isinstance(cause, HttpError):
                self._bad(cause)
            else:
                self._bad(HttpError(400, "bad_request", str(cause)))

    def eof_from_wire(self) -> None:
        self._eof = True
        if self._cur is not None:
            self._cur.body.fail(StreamReset("client closed before the request ended"))
        self._kick()

    def wire_lost(self) -> None:
        self._eof = True
        self.closed = True
        self._stop_timers()
        if self._task is not None:
            self._task.cancel()
        if self._cur is not None:
            self._cur.body.fail(StreamReset("client connection reset"))
        for ex in self._queue:
            ex.body.fail(StreamReset("client connection reset"))
        self._writable.set()
        self._kick()

    def _bad(self, err: HttpError) -> None:
        if self.error is not None:
            return
        self.error = Refusal(err.status, err.flag, err.reason, str(err), *self._what())
        log.info("refused a request: %s (%d)", err, err.status)
        self._stop_timers()
        cur = self._cur
        if cur is not None:
            cur.body.fail(StreamReset(f"bad request: {err}"))
            if not cur.started:
                # Never handed to the handler: it is not forwarded at all.
                self._queue.remove(cur)
                self._cur = None
        self._kick()

    def _what(self) -> tuple[str, str]:
        """Method and target of the request being parsed, for the access log."""
        if not self._p.url:
            return "-", "-"  # no request line yet (llhttp would report its method 0, DELETE)
        try:
            method = self._parser.get_method().decode("ascii")
        except (httptools.HttpParserError, UnicodeDecodeError):
            method = "-"
        return method, self._p.url[:256].decode("latin-1")

    def _head_timeout(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head on its way: the next one arms the timer again
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left > 0:
            self._head_timer = loop.call_later(left, self._head_timeout)
            return
        self._head_deadline = None
        if self.error is None and not self.closed:
            self._bad(
                HttpError(408, "headers_timeout", "request head not received in time", TIMEOUT)
            )

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.closed or self.error is not None:
            return
        loop = asyncio.get_running_loop()
        left = self._last + self.limits.idle_timeout - loop.time()
        if self._queue or self._head_deadline is not None or left > 0:
            # Busy, or a head on its way (the headers timer watches that): look again later.
            self._idle_timer = loop.call_later(max(left, 1.0), self._idle_check)
            return
        log.debug("closing an idle HTTP/1.1 connection")
        self._eof = True
        self.close_wire()
        self._kick()

    def _stop_timers(self) -> None:
        for t in (self._head_timer, self._idle_timer):
            if t is not None:
                t.cancel()
        self._head_timer = self._idle_timer = None
        self._head_deadline = None

    def _kick(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _consumed(self, _n: int) -> None:
        self._flow()

    def _flow(self) -> None:
        """Pause the wire while queued bodies or pipelined requests pile up."""
        buffered = sum(ex.body.buffered for ex in self._queue)
        if self._cur is not None:
            buffered += self._cur.body.buffered
        want_pause = buffered > HIGH_WATER or len(self._queue) > MAX_QUEUED
        if want_pause and not self._paused and self.wire is not None:
            self._paused = True
            self.wire.pause_reading()
        elif self._paused and buffered < LOW_WATER and len(self._queue) <= MAX_QUEUED:
            self._paused = False
            if self.wire is not None:
                self.wire.resume_reading()

    def send(self, data: bytes) -> None:
        self._last = asyncio.get_running_loop().time()
        super().send(data)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._p = _Parse(self.limits)
        if self._head_deadline is None:  # (the first head's deadline counts from the connect)
            self._head_deadline = self._last + self.limits.headers_timeout
            if self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(
                    self.limits.headers_timeout, self._head_timeout
                )

    def on_url(self, url: bytes) -> None:
        self._p.url += url
        if len(self._p.url) > self.limits.max_header_bytes:
            raise HttpError(414, "uri_too_long", "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._p.header(name, value)

    def _check_framing(self, hs: Headers) -> None:
        """What llhttp lets through but a backend might read differently: refused here."""
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise HttpError(400, "bad_framing", f"HTTP/{version} is not supported")
        te: list[str] = []
        lengths = hosts = 0
        for k, v in hs:  # one pass: this runs for every request
            if k == "content-length":
                lengths += 1
            elif k == "host":
                hosts += 1
            elif k == "transfer-encoding":
                te.append(v)
        if te:
            if version == "1.0":
                raise HttpError(400, "bad_framing", "Transfer-Encoding in an HTTP/1.0 request")
            if len(te) != 1 or te[0].strip().lower() != "chunked":
                raise HttpError(400, "bad_framing", "Transfer-Encoding other than chunked")
            if lengths:
                raise HttpError(400, "bad_framing", "Content-Length with Transfer-Encoding")
        if lengths > 1:
            raise HttpError(400, "bad_framing", "more than one Content-Length")
        if hosts > 1:
            raise HttpError(400, "bad_request", "more than one Host")

    def on_headers_complete(self) -> None:
        self._head_deadline = None  # (its timer stays armed: see __init__)
        p = self._parser
        hs = self._p.headers
        self._p.in_trailers = True
        self._check_framing(hs)
        method = p.get_method().decode("ascii")
        host = next((v for k, v in hs if k == "host"), "")
        te = any(k == "te" and "trailers" in v.lower() for k, v in hs)
        try:
            length = content_length(hs)
        except ValueError as exc:
            raise HttpError(400, "bad_framing", str(exc)) from None
        chunked = any(k == "transfer-encoding" for k, _ in hs)
        head = RequestHead(
            method,
            self._p.url.decode("latin-1"),
            host,
            [(k, v) for k, v in end_to_end(hs) if k != "expect"],
            te_trailers=te,
            content_length=None if chunked else length,
            end_stream=not chunked and not length,
        )
        ex = H1ServerExchange(self, head, p.should_keep_alive(), p.get_http_version() == "1.0")
        if any(k == "expect" and v.lower() == "100-continue" for k, v in hs):
            # We will read the body whatever the route decides; say so now rather than make the
            # client wait out its expect timeout.
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._cur = ex
        self._queue.append(ex)
        self._flow()
        self._kick()

    def on_body(self, body: bytes) -> None:
        if self._cur is not None:
            self._cur.body.feed(body)
            if self._cur.body.over_high_water:
                self._flow()

    def on_message_complete(self) -> None:
        if self._cur is not None:
            self._cur.body.end(self._p.trailers or None)
            self._cur = None

    # -- the request loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve requests in order until the client closes or one is not keep-alive."""
        try:
            while True:
                while not self._queue:
                    if self.error is not None:
                        await self._answer_bad()
                        return
                    if self._eof or self.closed:
                        return
                    self._wake = asyncio.get_running_loop().create_future()
                    await self._wake
                ex = self._queue[0]
                ex.started = True
                # A task of its own, so a client that goes away cancels the request and with
                # it the upstream attempt (or the backend would work for nobody, holding a
                # connection, until it answers).
                self._task = asyncio.ensure_future(self.handler(ex))
                try:
                    await self._task  # (cancelling us cancels it too)
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if me is not None and me.cancelling() == 0:
                        return  # only the request was cancelled: the client reset the wire
                    raise
                finally:
                    self._task = None
                    self._queue.popleft()
                    self._flow()
                if not ex.finished:
                    ex.reset()
                if not ex.keep_alive or self.closed:
                    return
        finally:
            self._stop_timers()
            self.close_wire()

    def answer_refusal(self, err: Refusal) -> None:
        """The refusal's status, once, with `connection: close` (the framing is lost)."""
        if self._answered:
            return
        self._answered = True
        body = f"{REASONS.get(err.status, 'Bad Request').lower()}: {err.detail}\n".encode()
        reason = REASONS.get(err.status, "Bad Request")
        self.send(
            _head_bytes(
                f"HTTP/1.1 {err.status} {reason}",
                [("content-type", "text/plain"), ("content-length", str(len(body)))],
                ["connection: close"],
            )
            + body
        )

    async def _answer_bad(self) -> None:
        assert self.error is not None
        if not self._answered and self.on_refused is not None:
            self.on_refused(self.error)
        self.answer_refusal(self.error)
        await self.drain()


# ---------------------------------------------------------------------------------------------
# Upstream


class H1Client(WireConn):
    """An upstream HTTP/1.1 connection carrying one request at a time (keep-alive between).

    `on_free(conn)` is called when a finished exchange leaves the connection reusable; `on_gone`
    when it can never be used again (closed by the backend while idle: the pool drops it)."""

    def __init__(
        self,
        on_free: Callable[[H1Client], None] | None = None,
        on_gone: Callable[[H1Client], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_free = on_free
        self.on_gone = on_gone
        self._parser = httptools.HttpResponseParser(self)
        self._p = _Parse()
        self.ex: H1ClientExchange | None = None
        self.requests = 0
        self._paused = False
        self.dead = False

    @property
    def reusable(self) -> bool:
        return not self.dead and not self.closed and self.ex is None

    def start(self, head: RequestHead) -> H1ClientExchange:
        assert self.ex is None and not self.dead
        self.requests += 1
        self._parser = httptools.HttpResponseParser(self)
        ex = self.ex = H1ClientExchange(self, head)
        extra = [f"host: {head.authority}"]
        if head.content_length is not None:
            extra.append(f"content-length: {head.content_length}")
            ex.framing = "length"
        elif head.end_stream:
            if head.method in ("POST", "PUT", "PATCH"):
                extra.append("content-length: 0")
            ex.framing = "none"
        else:
            extra.append("transfer-encoding: chunked")
            ex.framing = "chunked"
        if head.te_trailers:
            extra.append("te: trailers")
        hs = [(k, v) for k, v in head.headers if k != "content-length"]  # framing is ours
        # Held until the first body bytes or the end, so a small request is one write.
        ex.corked = _head_bytes(f"{head.method} {head.target} HTTP/1.1", hs, extra)
        return ex

    def _die(self, why: str, *, bad: bool = False) -> None:
        was_dead = self.dead
        self.dead = True
        ex = self.ex
        if ex is not None:
            err = UpstreamProtocolError(why) if bad else StreamReset(why)
            if not ex.response.done():
                ex.response.set_exception(err)
                ex.response.exception()
            ex.body.fail(err)
        if not was_dead and self.on_gone is not None:
            self.on_gone(self)

    def data_from_wire(self, data: bytes) -> None:
        if self.ex is None:
            self._die("unexpected bytes from an idle upstream connection")
            self.close_wire(abort=True)
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, StreamReset, ValueError) as exc:
            self._die(f"bad response: {exc}", bad=True)
            self.close_wire(abort=True)

    def eof_from_wire(self) -> None:
        ex = self.ex
        if ex is not None and ex.close_delimited and not ex.complete:
            ex.body.end()  # a close-delimited body: EOF is its end
            ex.complete = True
            ex.keep_alive = False
        self._die("upstream closed the connection")
        self.close_wire()

    def wire_lost(self) -> None:
        self._die("upstream connection reset")
        self._mark_lost()

    def _consumed(self, _n: int) -> None:
        ex = self.ex
        if self._paused and (ex is None or ex.body.buffered < LOW_WATER) and self.wire:
            self._paused = False
            self.wire.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._p = _Parse()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._p.header(name, value)

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        status = self._parser.get_status_code()
        self._p.in_trailers = True
        if 100 <= status < 200:
            return  # informational: the real response follows
        no_body = _no_body(status, ex.head.method)
        head = ResponseHead(status, end_to_end(self._p.headers), end_stream=no_body)
        ex.keep_alive = self._parser.should_keep_alive()
        if not ex.response.done():
            ex.response.set_result(head)
        if ex.head.method == "HEAD":
            # llhttp would wait for a body of content-length bytes; there is none.
            ex.body.end()
            ex.keep_alive = False
            ex.complete = True
            self._maybe_free()  # not kept alive: closed once the caller releases it
            return
        raw = self._p.headers
        ex.close_delimited = not no_body and not any(
            k in ("content-length", "transfer-encoding") for k, _ in raw
        )

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        assert ex is not None
        ex.body.feed(body)
        if ex.body.over_high_water and not self._paused and self.wire is not None:
            self._paused = True
            self.wire.pause_reading()

    def on_message_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        if not ex.response.done():
            return  # a 1xx message ended
        ex.body.end(self._p.trailers or None)
        ex.complete = True
        ex.keep_alive = ex.keep_alive and self._parser.should_keep_alive()
        self._maybe_free()

    def _maybe_free(self) -> None:
        ex = self.ex
        if ex is None or not (ex.complete and ex.request_done and ex.released):
            return
        self.ex = None
        if ex.keep_alive and not self.dead and not self.closed:
            if self.on_free is not None:
                self.on_free(self)
        else:
            self.dead = True
            self.close_wire()


class H1ClientExchange:
    def __init__(self, conn: H1Client, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.response: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.body = Body(conn._consumed)
        self.framing = "none"
        self.keep_alive = True
        self.complete = False
        self.request_done = False
        self.released = False
        self.close_delimited = False
        self.sent = 0
        self.corked = b""

    async def send_data(self, data: bytes) -> None:
        if not data:
            return
        if self.conn.dead:
            raise StreamReset("upstream connection closed")
        if self.framing == "none":
            # A body the head did not announce: we cannot frame it on this connection.
            raise StreamReset("request body after a head without one")
        self.sent += len(data)
        out = _chunk(data) if self.framing == "chunked" else data
        if self.corked:
            out, self.corked = self.corked + out, b""
        self.conn.send(out)
        await self.conn.drain()

    async def finish(self, trailers: Headers | None = None) -> None:
        out, self.corked = self.corked, b""
        if self.framing == "chunked":
            out += _last_chunk(trailers)
        if out and not self.conn.dead:
            self.conn.send(out)
        self.request_done = True
        await self.conn.drain()
        self.conn._maybe_free()

    def reset(self) -> None:
        self.released = True
        self.keep_alive = False
        self.conn.dead = True
        self.conn.ex = None
        self.conn.close_wire(abort=True)
        if not self.response.done():
            # Whoever awaits the response (the request handler) must not wait for a
            # connection we just closed: the request body failing resets us from the pump.
            self.response.set_exception(StreamReset("request reset"))
            self.response.exception()
        self.body.fail(StreamReset("request reset"))

    def release(self) -> None:
        self.released = True
        if not (self.complete and self.request_done):
            # Abandoned mid-exchange: the connection's state is unknown, so it goes.
            self.reset()
            return
        self.conn._maybe_free()
