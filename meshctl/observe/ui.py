"""`meshctl observe ui`: a live page with the service map and a filterable flow table.

One small HTTP server (asyncio streams; GET only, one request per connection) serves a static
page, its script and style, and a Server-Sent Events stream: on connect the flows held so far
and the current map, then each flow as it arrives and a fresh map at most once per
`map_interval_s` (graphviz runs in a worker thread, never on the loop that reads flows).

Flows name pods, and pods are hostile. The page builds every cell with `textContent`, never
markup; the map SVG (graphviz output of escaped labels) is parsed as XML and rebuilt through
an element and attribute allow-list before it enters the page; a Content-Security-Policy
allows only this server's own script, so even a slip could not run injected code. The server
binds loopback by default (flows reveal who talks to whom) and, bound there, answers only
requests whose Host names loopback, so a web page cannot read it through DNS rebinding.

A slow or stalled browser never holds up the flow source: each stream has a bounded queue, and
a stream that falls that far behind is closed (the browser's EventSource reconnects and gets
the current state).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from meshctl.observe.map import FlowLike, MapError, as_record, render_map

log = logging.getLogger("meshctl.observe.ui")

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The map opened on its own is an SVG document, which could run script: allow none.
MAP_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
MAX_STREAMS = 16
STREAM_QUEUE = 2048  # events a stream may lag behind before it is closed
HEARTBEAT_S = 15.0
WRITE_TIMEOUT_S = 10.0


class _Stream:
    """One browser's event stream: a bounded queue the broadcaster fills without waiting."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_QUEUE)
        self.overflowed = False

    def push(self, event: bytes) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # the writer sees the flag and closes this stream


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event. JSON has no raw newlines, so `data` is one line; values JSON
    cannot encode are shown as their text rather than failing the stream."""
    body = json.dumps(data, separators=(",", ":"), default=str, allow_nan=False)
    return f"event: {event}\ndata: {body}\n\n".encode()


def _jsonable(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-safe data: NaN and infinities (invalid JSON) become null, what JSON
    cannot hold becomes its text, and nesting stops at a sane depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if depth > 8:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


class _UI:
    def __init__(self, max_flows: int, map_interval_s: float) -> None:
        self.flows: deque[Mapping[str, Any]] = deque(maxlen=max(1, max_flows))
        self.json_flows: deque[Any] = deque(maxlen=max(1, max_flows))
        self.version = 0
        self.map_version = -1
        self.svg: bytes | None = None
        self.map_error: str | None = None
        self.source_state = "connecting"
        self.map_interval_s = map_interval_s
        self.streams: set[_Stream] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.changed = asyncio.Event()
        self.changed.set()  # draw the (empty) map straight away
        self.assets = {path: (STATIC / name).read_bytes() for path, (name, _) in ASSETS.items()}
        self.allowed_hosts: set[str] | None = None

    def broadcast(self, event: bytes) -> None:
        for stream in self.streams:
            stream.push(event)

    async def consume(self, flows: Callable[[], AsyncIterator[FlowLike]]) -> None:
        """Read the flow source into the bounded store; a source that ends or fails leaves
        the page showing what it had, and says so."""
        self.source_state = "live"
        self.broadcast(sse("source", self.source_state))
        try:
            async for item in flows():
                flow = as_record(item)
                if flow is None:
                    continue
                data = _jsonable(flow)
                self.flows.append(flow)
                self.json_flows.append(data)
                self.version += 1
                self.changed.set()
                self.broadcast(sse("flow", data))
            self.source_state = "ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("flow source failed: %s", exc)
            self.source_state = f"failed: {exc}"
        self.broadcast(sse("source", self.source_state))
        self.changed.set()

    async def refresh_map(self) -> None:
        """Redraw the map when flows changed, at most once per interval."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.version == self.map_version and self.svg is not None:
                continue
            version, snapshot = self.version, list(self.flows)
            started = time.monotonic()
            try:
                svg = await asyncio.to_thread(render_map, snapshot, "svg")
                self.svg, self.map_error = svg, None
                self.broadcast(sse("map", svg.decode("utf-8", errors="replace")))
            except MapError as exc:
                self.map_error = str(exc)
                self.broadcast(sse("maperror", self.map_error))
            self.map_version = version
            # A big map on a busy node takes a while to draw: redraw at most a third of the
            # time, so the map never takes over the CPU the flows are read with.
            await asyncio.sleep(max(self.map_interval_s, 2 * (time.monotonic() - started)))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.writers) >= MAX_CONNECTIONS:
            writer.close()
            return
        self.writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            await self._reply(writer, 431, b"request head too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._reply(writer, 400, b"bad request line\n")
            return
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await self._reply(writer, 400, b"bad header line\n")
                return
            headers[name.strip().lower()] = value.strip()
        if self.allowed_hosts is not None and headers.get("host", "").lower() not in (
            self.allowed_hosts
        ):
            await self._reply(writer, 403, b"this server answers only to its loopback address\n")
            return
        if method not in ("GET", "HEAD"):
            await self._reply(writer, 405, b"only GET\n", extra={"Allow": "GET, HEAD"})
            return
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if path in ASSETS:
            csp = PAGE_CSP if path == "/" else None
            await self._reply(
                writer, 200, self.assets[path], ASSETS[path][1], csp=csp, head_only=head_only
            )
        elif path == "/map.svg":
            if self.svg is None:
                await self._reply(writer, 503, (self.map_error or "no map yet").encode() + b"\n")
            else:
                await self._reply(
                    writer, 200, self.svg, "image/svg+xml", csp=MAP_CSP, head_only=head_only
                )
        elif path == "/flows.json":
            body = json.dumps(list(self.json_flows), separators=(",", ":")).encode()
            await self._reply(writer, 200, body, "application/json", head_only=head_only)
        elif path == "/events":
            await self._stream(writer, head_only)
        else:
            await self._reply(writer, 404, b"not found\n")

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        csp: str | None = None,
        head_only: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        reasons = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                   405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                   503: "Service Unavailable"}  # fmt: skip
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Connection": "close",
            **({"Content-Security-Policy": csp} if csp else {}),
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + (b"" if head_only else body))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    async def _stream(self, writer: asyncio.StreamWriter, head_only: bool) -> None:
        if len(self.streams) >= MAX_STREAMS:
            await self._reply(writer, 503, b"too many open pages\n")
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
        )
        if head_only:
            await writer.drain()
            return
        stream = _Stream()
        # The state so far, then live events: both built before any await, so none is missed
        # or sent twice.
        first = [b"retry: 2000\n\n", sse("source", self.source_state)]
        first.append(sse("flows", list(self.json_flows)))
        if self.svg is not None:
            first.append(sse("map", self.svg.decode("utf-8", errors="replace")))
        elif self.map_error:
            first.append(sse("maperror", self.map_error))
        self.streams.add(stream)
        try:
            writer.write(b"".join(first))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            while not stream.overflowed:
                try:
                    event = await asyncio.wait_for(stream.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    event = b": keep-alive\n\n"
                if event is None:
                    return
                batch = [event]
                while not stream.queue.empty():
                    more = stream.queue.get_nowait()
                    if more is None:
                        return
                    batch.append(more)
                writer.write(b"".join(batch))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        finally:
            self.streams.discard(stream)


async def follow_flows(
    backlog: Iterable[FlowLike],
    run: Callable[[Callable[[FlowLike], None]], Awaitable[None]],
    *,
    max_pending: int = 10000,
) -> AsyncGenerator[FlowLike, None]:
    """`backlog`, then what a callback-style follower passes to `emit` while `run(emit)` runs:
    the flow source `serve_ui` wants, made from a stream reader that calls back (like
    `meshctl observe --follow`'s). Flows beyond `max_pending` not yet taken are dropped, never
    buffered without bound; the follower is cancelled when the iterator is closed, and its
    error, if it fails, is raised here."""
    for flow in backlog:
        yield flow
    queue: asyncio.Queue[FlowLike] = asyncio.Queue(max(1, max_pending))
    finished = asyncio.Event()

    def emit(flow: FlowLike) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(flow)

    async def follower() -> None:
        try:
            await run(emit)
        finally:
            finished.set()

    task = asyncio.create_task(follower())
    try:
        while not (finished.is_set() and queue.empty()):
            if queue.empty():
                getter = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(finished.wait())
                try:
                    await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
                continue
            yield queue.get_nowait()
        await task  # the follower's error, if any
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _loopback_hosts(host: str, port: int) -> set[str] | None:
    """The Host header values a loopback-bound server accepts, or None (no check) when the
    user chose to bind a non-loopback address."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return None
    names = {"127.0.0.1", "localhost", "[::1]", host.lower()}
    if ":" in host and not host.startswith("["):
        names.add(f"[{host.lower()}]")
    return {f"{name}:{port}" for name in names}


async def serve_ui(
    flows: Callable[[], AsyncIterator[FlowLike]],
    host: str,
    port: int,
    *,
    ready: asyncio.Event | None = None,
    on_listening: Callable[[str, int], None] | None = None,
    max_flows: int = 2000,
    map_interval_s: float = 1.0,
) -> None:
    """Serve the live page until cancelled.

    `flows` is called once and read to its end (a finite recording, or a follow stream that
    never ends); it may yield mappings in the shared flow shape or objects with `to_dict()`.
    `ready` is set, and `on_listening(host, port)` called with the bound port (useful with
    port 0), once the server accepts connections. At most `max_flows` recent flows are kept
    for the table and the map.
    """
    ui = _UI(max_flows, map_interval_s)
    server = await asyncio.start_server(ui.handle, host, port, limit=MAX_HEAD)
    sockname = server.sockets[0].getsockname()
    bound_port = int(sockname[1])
    ui.allowed_hosts = _loopback_hosts(host, bound_port)
    if on_listening is not None:
        on_listening(host, bound_port)
    if ready is not None:
        ready.set()
    started = time.monotonic()
    log.info("observe ui on http://%s:%d/", host, bound_port)
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(ui.consume(flows))
            tasks.create_task(ui.refresh_map())
            tasks.create_task(server.serve_forever())
    finally:
        # Open pages hold their streams forever: end them, or closing the server would wait
        # for them (Python 3.12 waits for every connection).
        server.close()
        for stream in list(ui.streams):
            stream.overflowed = True
            with contextlib.suppress(asyncio.QueueFull):
                stream.queue.put_nowait(None)
        for writer in list(ui.writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)
        log.debug("observe ui stopped after %.0f s", time.monotonic() - started)
