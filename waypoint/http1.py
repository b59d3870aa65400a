"""HTTP/1.1 waypoint stream: parse requests, route them, forward with retries and timeouts.

The parser side is sans-IO (`MessageReader` turns bytes into complete messages via httptools);
the glue takes any asyncio (reader, writer) pair, so a plain TCP socket today and an HBONE
CONNECT stream later carry the same code. Upstream connections come from a `connect` callback
that the proxy supplies (plain TCP in tests, HBONE to the backend's ztunnel in the mesh).

Known limit of this first version: request and response bodies are buffered per message
(bounded by `max_body`), not streamed; see the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

from mesh.config.model import BackendRef, HeaderModifier, RouteRetry, RouteTimeouts
from waypoint.routing import Forward, Redirect, Request, RouteTable, apply_filters, modify_headers

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
        "content-length",
    }
)

Connect = Callable[
    [BackendRef | None], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]
Authorize = Callable[[Request], str | None]  # returns the denying policy's name, or None


class BadMessage(Exception):
    """Malformed HTTP: the connection answers 400 (or 502 upstream) and closes."""


@dataclass(slots=True)
class Message:
    method: str = ""
    target: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True


class MessageReader:
    """Sans-IO: feed bytes, collect complete messages (requests or responses)."""

    def __init__(self, response: bool = False, max_body: int = 16 << 20) -> None:
        self.done: deque[Message] = deque()
        self._cur = Message()
        self._max_body = max_body
        self._response = response
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise BadMessage("upgrade not supported") from exc
        except httptools.HttpParserError as exc:
            # A callback's own BadMessage (e.g. body too large) says more than the wrapper.
            if isinstance(exc.__context__, BadMessage):
                raise exc.__context__ from None
            raise BadMessage(str(exc)) from exc

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._cur = Message()

    def on_url(self, url: bytes) -> None:
        self._cur.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        p = self._parser
        if isinstance(p, httptools.HttpRequestParser):
            self._cur.method = p.get_method().decode("ascii")
        else:
            self._cur.status = p.get_status_code()
        self._cur.keep_alive = p.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._cur.body += body
        if len(self._cur.body) > self._max_body:
            raise BadMessage("body too large")

    def on_message_complete(self) -> None:
        self.done.append(self._cur)


REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _hop_by_hop(headers: list[tuple[str, str]]) -> frozenset[str]:
    """The fixed hop-by-hop set plus any header a Connection header names (RFC 9110 7.6.1)."""
    named = [
        t.strip().lower()
        for k, v in headers
        if k == "connection"
        for t in v.split(",")
        if t.strip()
    ]
    return HOP_BY_HOP.union(named) if named else HOP_BY_HOP


def serialize_response(
    status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool
) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    hop = _hop_by_hop(headers)
    lines.extend(f"{k}: {v}" for k, v in headers if k not in hop)
    lines.append(f"content-length: {len(body)}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def serialize_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    hop = _hop_by_hop(headers)
    lines.extend(f"{k}: {v}" for k, v in headers if k not in hop)
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(slots=True)
class Outcome:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Http1Stream:
    """One downstream HTTP/1.1 connection inside the waypoint (one HBONE stream)."""

    def __init__(
        self,
        table: Callable[[], RouteTable],
        connect: Connect,
        *,
        authorize: Authorize | None = None,
        on_request: Callable[[Request, int, float, int, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._table = table
        self._connect = connect
        self._authorize = authorize
        self._on_request = on_request
        self._rng = rng or random.Random()
        # Keep-alive upstream connections per backend: a connect per request costs more than
        # the whole routing decision.
        self._idle: dict[
            BackendRef | None, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        ] = {}

    max_idle = 64

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = MessageReader()
        try:
            async with asyncio.TaskGroup() as tg:  # owns request mirrors
                while True:
                    while not parser.done:
                        data = await reader.read(65536)
                        if not data:
                            return
                        try:
                            parser.feed(data)
                        except BadMessage as exc:
                            writer.write(
                                serialize_response(
                                    400,
                                    [("content-type", "text/plain")],
                                    f"bad request: {exc}\n".encode(),
                                    False,
                                )
                            )
                            await writer.drain()
                            return
                    msg = parser.done.popleft()
                    t0 = time.monotonic()
                    req = Request.from_target(msg.method, msg.target, msg.headers)
                    out = await self._handle(req, msg, tg)
                    keep = msg.keep_alive
                    writer.write(serialize_response(out.status, out.headers, out.body, keep))
                    await writer.drain()
                    if self._on_request is not None:
                        self._on_request(
                            req, out.status, time.monotonic() - t0, len(msg.body), len(out.body)
                        )
                    if not keep:
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _handle(self, req: Request, msg: Message, tg: asyncio.TaskGroup) -> Outcome:
        if self._authorize is not None:
            denied_by = self._authorize(req)
            if denied_by is not None:
                return Outcome(
                    403,
                    [("content-type", "text/plain")],
                    f"RBAC: access denied (policy {denied_by})\n".encode(),
                )
        decision = self._table().route(req)
        timeouts, retry = RouteTimeouts(), RouteRetry()
        resp_mods: list[HeaderModifier] = []
        backend: BackendRef | None = None
        fwd = Forward(req.path, req.query, req.host, list(req.headers))
        if decision is not None and decision.rule is not None and decision.chooser is not None:
            rule = decision.rule
            timeouts, retry = rule.timeouts, rule.retry
            res = apply_filters(rule.filters, req, decision.matched_prefix)
            if isinstance(res, Redirect):
                return Outcome(res.status, [("location", res.location)], b"")
            fwd = res
            if rule.backend_refs:
                backend = decision.chooser.choose(self._rng.random())
                if backend is None:
                    return Outcome(
                        500,
                        [("content-type", "text/plain")],
                        b"no backend with a non-zero weight\n",
                    )
                if backend.filters:
                    res2 = apply_filters(
                        backend.filters,
                        Request(req.method, fwd.path, fwd.query, tuple(fwd.headers), fwd.host),
                        decision.matched_prefix,
                    )
                    if isinstance(res2, Redirect):
                        return Outcome(res2.status, [("location", res2.location)], b"")
                    res2.response_modifiers[:0] = fwd.response_modifiers
                    res2.mirrors[:0] = fwd.mirrors
                    fwd = res2
            resp_mods = fwd.response_modifiers
        headers = [(k, v) for k, v in fwd.headers if k != "host"]
        headers.insert(0, ("host", fwd.host))
        target = fwd.path + ("?" + fwd.query if fwd.query else "")
        raw = serialize_request(req.method, target, headers, bytes(msg.body))
        for m in fwd.mirrors:
            tg.create_task(self._mirror(m, raw))
        try:
            out = await asyncio.wait_for(
                self._with_retries(backend, raw, timeouts, retry), timeouts.request
            )
        except TimeoutError:
            out = Outcome(504, [("content-type", "text/plain")], b"upstream request timeout\n")
        for mod in resp_mods:
            out.headers = modify_headers(out.headers, mod)
        return out

    async def _with_retries(
        self, backend: BackendRef | None, raw: bytes, timeouts: RouteTimeouts, retry: RouteRetry
    ) -> Outcome:
        attempt = 0
        while True:
            try:
                out = await asyncio.wait_for(self._once(backend, raw), timeouts.backend_request)
            except TimeoutError:
                out = Outcome(504, [("content-type", "text/plain")], b"upstream request timeout\n")
            except (OSError, BadMessage) as exc:
                out = Outcome(
                    503,
                    [("content-type", "text/plain")],
                    f"upstream connect error: {exc}\n".encode(),
                )
            # Nothing has been sent to the client yet (responses are buffered), so a retry is safe.
            if attempt >= retry.attempts or out.status not in retry.codes:
                return out
            attempt += 1
            await asyncio.sleep(retry.backoff * (2 ** (attempt - 1)))

    async def _once(self, backend: BackendRef | None, raw: bytes) -> Outcome:
        """One try on a pooled keep-alive connection; a stale pooled one is replaced once."""
        idle = self._idle.get(backend)
        if idle:
            r, w = idle.pop()
            try:
                return await self._exchange(backend, r, w, raw)
            except (OSError, BadMessage):
                pass  # the backend closed an idle connection: try a fresh one
        r, w = await self._connect(backend)
        return await self._exchange(backend, r, w, raw)

    async def _exchange(
        self,
        backend: BackendRef | None,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        raw: bytes,
    ) -> Outcome:
        reuse = False
        try:
            w.write(raw)
            await w.drain()
            parser = MessageReader(response=True)
            while not parser.done:
                data = await r.read(65536)
                if not data:
                    raise BadMessage("upstream closed before a complete response")
                parser.feed(data)
            m = parser.done.popleft()
            reuse = m.keep_alive and not parser.done
            return Outcome(m.status, m.headers, bytes(m.body))
        finally:
            pool = self._idle.setdefault(backend, [])
            if reuse and len(pool) < self.max_idle:
                pool.append((r, w))
            else:
                w.close()

    async def _mirror(self, backend: BackendRef, raw: bytes) -> None:
        """A mirror's response is discarded and its failure never touches the main request."""
        with contextlib.suppress(OSError, BadMessage, TimeoutError):
            await asyncio.wait_for(self._once(backend, raw), 10.0)
