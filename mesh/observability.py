"""The small HTTP/1.1 servers both proxies expose: metrics, readiness, admin.

Not a hot path, so it stays simple: asyncio streams, one request per connection
(`Connection: close`), GET/HEAD only, the HTTP/1.1 rules the CA shares (`mesh.httpserver`).
It must never crash the proxy: every malformed or oversized request gets a 4xx and the
connection is closed; a failing handler is a 500.
Admin defaults to loopback (DESIGN.md: 15000 is loopback-only) because `/logging` changes state.

Streams (`streams=`, e.g. ztunnel's `/flows`) are the one exception to "one short answer": the
body is close-delimited and written as the handler yields it. A stream must not cost the proxy
more than one bounded transport buffer per reader: each write waits for `drain()` (so a slow
reader only slows its own stream, and a stalled one is cut after `STREAM_STALL`), and the
stream ends as soon as the reader hangs up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from mesh.config.dump import snapshot_to_json
from mesh.config.snapshot import Snapshot
from mesh.httpserver import HttpError, Request, read_request, render, send_and_close
from mesh.metrics import MeshMetrics

log = logging.getLogger("mesh.observability")

__all__ = ["STREAM_STALL", "JsonHandler", "ObservabilityServer", "StreamHandler", "admin_routes"]

# A route handler gets the query parameters and returns (status, JSON-able body).
JsonHandler = Callable[[Mapping[str, str]], tuple[int, Any]]
# A stream handler gets the query parameters and returns the body's chunks; it raises
# HttpError (or ValueError: a 400) at once, before any chunk, for parameters it refuses.
StreamHandler = Callable[[Mapping[str, str]], tuple[str, AsyncIterator[bytes]]]
STREAM_STALL = 30.0  # a stream reader that takes no bytes for this long is cut

_MAX_HEAD = 16 * 1024
_READ_TIMEOUT = 10.0


class ObservabilityServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        metrics: MeshMetrics | None = None,
        ready: Callable[[], bool] | None = None,
        routes: Mapping[str, JsonHandler] | None = None,
        streams: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.ready = ready
        self.routes = dict(routes or {})
        self.streams = dict(streams or {})
        self._live: set[asyncio.StreamWriter] = set()  # open streams, ended at close()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=_MAX_HEAD
        )

    async def close(self) -> None:
        for w in list(self._live):  # a follower would otherwise outlive the server
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ObservabilityServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = "text/plain; charset=utf-8"
        try:
            try:
                req = await read_request(reader, within=_READ_TIMEOUT)
                stream = self.streams.get(req.path) if req.method == "GET" else None
                if stream is not None:
                    await self._stream(stream, req, reader, writer)
                    return
                status, ctype, body, head_only = self._respond(req)
            except HttpError as exc:
                status, ctype, body, head_only = exc.status, text, f"{exc}\n".encode(), False
            await send_and_close(writer, render(status, ctype, body, head_only=head_only))
        except (ConnectionError, OSError):  # the client went away; nothing to answer
            await send_and_close(writer, b"")
        except Exception:  # never let one request take the server down
            log.exception("observability request failed")
            await send_and_close(writer, b"")

    async def _stream(
        self,
        handler: StreamHandler,
        req: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            ctype, chunks = handler(req.query)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncache-control: no-cache\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        # The reader has nothing more to say after its request: EOF (or anything) from it
        # means it is gone, and the stream stops at once rather than at its next write.
        gone = asyncio.ensure_future(reader.read(1))
        it = aiter(chunks)
        self._live.add(writer)
        try:
            writer.write(head)
            await asyncio.wait_for(writer.drain(), STREAM_STALL)
            while True:
                nxt = asyncio.ensure_future(anext(it))
                await asyncio.wait((nxt, gone), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    break
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), STREAM_STALL)
        except TimeoutError:
            log.info("stream %s: reader took nothing for %.0fs; cut", req.path, STREAM_STALL)
        finally:
            self._live.discard(writer)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()
            await send_and_close(writer, b"")

    def _respond(self, req: Request) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        if req.method not in ("GET", "HEAD"):
            return 405, text, b"only GET and HEAD\n", False
        head_only = req.method == "HEAD"
        path = req.path
        if path == "/metrics" and self.metrics is not None:
            ctype = "text/plain; version=0.0.4; charset=utf-8"
            return 200, ctype, self.metrics.exposition(), head_only
        if path == "/healthz/ready" and self.ready is not None:
            ok = self.ready()
            return (200 if ok else 503), text, (b"ready\n" if ok else b"not ready\n"), head_only
        handler = self.routes.get(path)
        if handler is None:
            return 404, text, b"not found\n", head_only
        try:
            status, obj = handler(req.query)
            body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
        except Exception as exc:
            log.exception("admin handler %s failed", path)
            return 500, text, f"{type(exc).__name__}\n".encode(), head_only
        return status, "application/json", body, head_only


def admin_routes(
    snapshot: Callable[[], Snapshot],
    extra: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, JsonHandler]:
    """The admin port's routes: `/config_dump` of the current snapshot and `/logging`
    (`?level=debug` sets the root level; `?mesh.config=debug` sets one logger).

    `extra` adds proxy-specific sections to the dump (ztunnel: certificates with expiry)."""

    def config_dump(_: Mapping[str, str]) -> tuple[int, Any]:
        dump = snapshot_to_json(snapshot())
        if extra is not None:
            dump.update(extra())
        return 200, dump

    def logging_(q: Mapping[str, str]) -> tuple[int, Any]:
        names = logging.getLevelNamesMapping()
        changed = {}
        for key, value in q.items():
            level = names.get(value.upper())
            if level is None:
                return 400, {"error": f"unknown level {value!r}", "levels": sorted(names)}
            logger = logging.getLogger(None if key == "level" else key)
            logger.setLevel(level)
            changed[logger.name] = logging.getLevelName(level)
        root = logging.getLogger()
        return 200, {"changed": changed, "root": logging.getLevelName(root.level)}

    return {"/config_dump": config_dump, "/logging": logging_}
