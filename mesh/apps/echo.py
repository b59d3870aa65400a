"""The lab's built-in app: an HTTP echo (HTTP/1.1, or h2c with prior knowledge) that reports
who called it, or a raw TCP echo.

Manifests need no image: a pod runs `python -m mesh.apps.echo`, and every answer says which
address the caller came from (as the kernel reports it to the app), which pod answered, and
what the request looked like. That is what the demo and the end-to-end tests assert on: the
peer address shows whether traffic went through the mesh, the pod name shows load balancing.

One asyncio Protocol per connection, httptools for parsing, keep-alive; no per-request logging.
A connection that opens with the HTTP/2 preface is served by `h2` instead (the benchmarks
compare HTTP/1.1 with HTTP/2 through each mesh, so the app must speak both on one port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from http import HTTPStatus
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httptools

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_WINDOW = 16 * 1024 * 1024  # large windows: a 16 KiB-body benchmark must not stall on them


def _fmt(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class HttpEcho(asyncio.Protocol):
    """Answers each request with a JSON description of the request and its caller."""

    __slots__ = (
        "_body_len",
        "_h2",
        "_headers",
        "_ident",
        "_local",
        "_parser",
        "_peer",
        "_sniff",
        "_transport",
        "_url",
    )

    def __init__(self, ident: dict[str, str]) -> None:
        self._ident = ident
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._headers: dict[str, str] = {}
        self._url = b""
        self._body_len = 0
        self._peer = ""
        self._local = ""
        self._sniff: bytes | None = b""  # first bytes until HTTP/1 vs HTTP/2 is decided
        self._h2: H2Echo | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only compatible
        self._transport = t = cast(asyncio.Transport, transport)
        self._peer = _fmt(t.get_extra_info("peername"))
        self._local = _fmt(t.get_extra_info("sockname"))

    def data_received(self, data: bytes) -> None:
        if self._h2 is not None:
            self._h2.feed(data)
            return
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                self._sniff = data  # could still be either: wait for more
                return
            self._sniff = None
            if data.startswith(H2_PREFACE):
                assert self._transport is not None
                self._h2 = H2Echo(self._transport, self._ident, self._peer, self._local)
                self._h2.feed(data)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(400, b'{"error":"upgrade not supported"}', close=True)
        except httptools.HttpParserError as exc:
            msg = json.dumps({"error": f"bad request: {exc}"}).encode()
            self._reply(400, msg, close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self._url = b""
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        payload = json.dumps(self.describe(), separators=(",", ":")).encode() + b"\n"
        self._reply(200, payload, close=not self._parser.should_keep_alive(), head=method == "HEAD")

    def describe(self) -> dict[str, object]:
        """The answer's JSON: who called, who answered, what the request looked like (also
        what tests' backends built on this class answer with)."""
        return {
            "pod": self._ident["pod"],
            "namespace": self._ident["namespace"],
            "peer": self._peer,
            "local": self._local,
            "method": self._parser.get_method().decode(),
            "path": self._url.decode("latin-1"),
            "headers": self._headers,
            "body_bytes": self._body_len,
        }

    def _reply(
        self,
        status: int,
        payload: bytes,
        *,
        close: bool,
        head: bool = False,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
        head_bytes = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            % (
                status,
                reason,
                len(payload),
            )
        )
        head_bytes += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
        head_bytes += b"connection: close\r\n\r\n" if close else b"\r\n"
        t.write(head_bytes if head else head_bytes + payload)
        if close:
            t.close()


class H2Echo:
    """The same answers over h2c: one JSON reply per stream once its request has ended."""

    __slots__ = ("_conn", "_ident", "_local", "_peer", "_streams", "_transport")

    def __init__(
        self, transport: asyncio.Transport, ident: dict[str, str], peer: str, local: str
    ) -> None:
        self._transport = transport
        self._ident = ident
        self._peer = peer
        self._local = local
        self._streams: dict[int, tuple[dict[str, str], int]] = {}
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(cfg)
        self._conn.local_settings.initial_window_size = H2_WINDOW
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(H2_WINDOW)

    def feed(self, data: bytes) -> None:
        conn = self._conn
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._transport.write(conn.data_to_send())
            self._transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._streams[ev.stream_id] = ({str(k): str(v) for k, v in ev.headers}, 0)
            elif isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                headers, n = self._streams.get(ev.stream_id, ({}, 0))
                self._streams[ev.stream_id] = (headers, n + len(ev.data))
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self._streams:
                self._answer(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self._streams.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._transport.write(conn.data_to_send())
                self._transport.close()
                return
        out = conn.data_to_send()
        if out:
            self._transport.write(out)

    def _answer(self, stream_id: int) -> None:
        headers, n = self._streams.pop(stream_id, ({}, 0))
        method = headers.get(":method", "GET")
        body = {
            "pod": self._ident["pod"],
            "namespace": self._ident["namespace"],
            "peer": self._peer,
            "local": self._local,
            "method": method,
            "path": headers.get(":path", ""),
            "headers": {k: v for k, v in headers.items() if not k.startswith(":")},
            "body_bytes": n,
            "protocol": "h2",
        }
        payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self._conn.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
            ],
            end_stream=method == "HEAD",
        )
        if method != "HEAD":
            # answers are a few hundred bytes: far inside the peer's smallest legal window
            self._conn.send_data(stream_id, payload, end_stream=True)


class TcpEcho(asyncio.Protocol):
    """Sends back every byte; pauses reading while the peer is slow to take them."""

    __slots__ = ("_transport",)

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def pause_writing(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    def eof_received(self) -> bool:
        assert self._transport is not None
        if self._transport.can_write_eof():
            self._transport.write_eof()
        return True


async def serve(host: str, port: int, mode: str) -> None:
    ident = {
        "pod": os.environ.get("POD_NAME", os.uname().nodename),
        "namespace": os.environ.get("POD_NAMESPACE", ""),
    }
    loop = asyncio.get_running_loop()
    if mode == "http":
        server = await loop.create_server(lambda: HttpEcho(ident), host, port, backlog=1024)
    else:
        server = await loop.create_server(TcpEcho, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"echo ({mode}) listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="echo", description="HTTP/TCP echo for the lab")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--mode", choices=["http", "tcp"], default="http")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.host, args.port, args.mode))
    except OSError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
