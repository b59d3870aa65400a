"""An open-loop HTTP load generator that does not hide tail latency.

A closed-loop client (send, wait, send) slows down when the server does, so a stall delays the
requests that would have measured it: coordinated omission. Here request *i* is due at
`t0 + i / rate` whatever happened before; its latency is measured from that due time, so time
spent waiting for a free connection counts, as it would for a real user arriving on schedule.
`--rate 0` runs closed-loop at the maximum rate instead (one request in flight per
connection), which is how the maximum throughput is found.

HTTP/1.1 keep-alive (httptools parser) or HTTP/2 (h2, many streams per connection).
Prints one JSON object: achieved rate, percentiles in milliseconds, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import httptools

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Results:
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    # Set once `expected` requests have an outcome (answered or failed): the drain phase.
    expected: int = -1
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, due_ns: int, status: int) -> None:
        self.latencies_ns.append(time.perf_counter_ns() - due_ns)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self._check()

    def fail(self, n: int = 1) -> None:
        self.errors += n
        self._check()

    def _check(self) -> None:
        if self.expected >= 0 and len(self.latencies_ns) + self.errors >= self.expected:
            self.settled.set()


def percentile(sorted_ns: list[int], pct: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return math.nan
    # rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, not 999
    rank = max(1, math.ceil(round(pct / 100.0 * len(sorted_ns), 9)))
    return sorted_ns[rank - 1] / 1e6


class Http1Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, request: bytes, results: Results, on_idle: Any) -> None:
        self.request = request
        self.results = results
        self.on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.due_ns = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, due_ns: int) -> None:
        assert self.transport is not None
        self.due_ns = due_ns
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.results.fail()
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        self.results.record(self.due_ns, self.parser.get_status_code())
        self.on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.due_ns:
            self.results.fail()
        if not self.closed.done():
            self.closed.set_result(None)


class Http2Conn(asyncio.Protocol):
    """One HTTP/2 connection carrying up to `max_streams` concurrent requests."""

    def __init__(
        self, host: str, path: str, body: bytes, results: Results, max_streams: int
    ) -> None:
        self.headers = [
            (":method", "POST" if body else "GET"),
            (":path", path),
            (":scheme", "http"),
            (":authority", host),
        ]
        if body:
            self.headers.append(("content-length", str(len(body))))
        self.body = body
        self.results = results
        self.max_streams = max_streams
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.transport: asyncio.Transport | None = None
        self.inflight: dict[int, tuple[int, int]] = {}  # stream → (due_ns, status)
        self.closed = asyncio.get_running_loop().create_future()
        self.on_idle: Any = None
        # Request bodies waiting for flow-control window (16 KiB bodies on many streams can
        # exceed the peer's initial 64 KiB connection window before its first WINDOW_UPDATE).
        self.blocked: deque[int] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * 1024 * 1024)
        self.transport.write(self.h2.data_to_send())

    @property
    def free(self) -> bool:
        return len(self.inflight) < self.max_streams

    def send(self, due_ns: int) -> None:
        assert self.transport is not None
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, self.headers, end_stream=not self.body)
        self.inflight[sid] = (due_ns, 0)
        if self.body:
            self.blocked.append(sid)
            self._send_bodies()
        self.transport.write(self.h2.data_to_send())

    def _send_bodies(self) -> None:
        while self.blocked:
            sid = self.blocked[0]
            if sid not in self.inflight:  # reset meanwhile
                self.blocked.popleft()
                continue
            if self.h2.local_flow_control_window(sid) < len(self.body):
                return
            self.blocked.popleft()
            self.h2.send_data(sid, self.body, end_stream=True)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception:  # a protocol error ends this connection, not the run
            self.results.fail(len(self.inflight))
            self.inflight.clear()
            assert self.transport is not None
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                due, _ = self.inflight.get(ev.stream_id, (0, 0))
                status = int(dict(ev.headers).get(b":status", b"0"))
                self.inflight[ev.stream_id] = (due, status)
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                due, status = self.inflight.pop(ev.stream_id, (0, 0))
                if due:
                    self.results.record(due, status)
                    if self.on_idle:
                        self.on_idle(self)
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in self.inflight:
                del self.inflight[ev.stream_id]
                self.results.fail()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._send_bodies()
        assert self.transport is not None
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.results.fail(len(self.inflight))
        self.inflight.clear()
        if not self.closed.done():
            self.closed.set_result(None)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    body = b"x" * args.body_size
    method = "POST" if body else "GET"
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    results = Results()
    idle: deque[Any] = deque()
    backlog: deque[int] = deque()  # due times of requests waiting for a connection

    phase = "warmup"

    def on_idle(conn: Any) -> None:
        if phase != "run":
            return
        if backlog:
            conn.send(backlog.popleft())
        elif args.rate == 0:
            conn.send(time.perf_counter_ns())
        else:
            idle.append(conn)

    conns: list[Any] = []
    for _ in range(args.connections):
        if args.http2:
            conn: Any = Http2Conn(f"{host}:{port}", path, body, results, args.streams)
            conn.on_idle = on_idle
            await loop.create_connection(lambda c=conn: c, host, port)
        else:
            conn = Http1Conn(request, results, on_idle)
            await loop.create_connection(lambda c=conn: c, host, port)
        conns.append(conn)

    # Warm-up: one request per connection, not recorded.
    warm = Results()
    for c in conns:
        c.results = warm
        c.send(time.perf_counter_ns())
    warm.expected = len(conns)
    try:
        await asyncio.wait_for(warm.settled.wait(), 10)
    except TimeoutError:
        raise SystemExit("loadgen: warm-up requests got no answer within 10 s") from None
    for c in conns:
        c.results = results

    phase = "run"
    t0 = time.perf_counter_ns()
    stop_at_ns = t0 + int(args.duration * 1e9)
    if args.rate == 0:
        for c in conns:
            c.send(time.perf_counter_ns())
        await asyncio.sleep(args.duration)
        phase = "stop"
        sent = len(results.latencies_ns) + results.errors
    else:
        idle.extend(c for c in conns for _ in range(args.streams if args.http2 else 1))
        interval_ns = 1e9 / args.rate
        i = 0
        while True:
            now = time.perf_counter_ns()
            if now >= stop_at_ns:
                break
            while t0 + int(i * interval_ns) <= now:
                due = t0 + int(i * interval_ns)
                i += 1
                if idle:
                    idle.popleft().send(due)
                else:
                    backlog.append(due)
            next_due = t0 + int(i * interval_ns)
            await asyncio.sleep(max(0.0, (next_due - time.perf_counter_ns()) / 1e9))
        sent = i
        results.expected = sent
        results.fail(0)
        try:
            await asyncio.wait_for(results.settled.wait(), args.drain_ns / 1e9)
        except TimeoutError:
            # Never answered within the drain time: counted as errors, not as latencies.
            results.errors = sent - len(results.latencies_ns)
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(results.latencies_ns)
    out: dict[str, Any] = {
        "url": args.url,
        "protocol": "h2" if args.http2 else "http/1.1",
        "target_rate": args.rate,
        "connections": args.connections,
        "body_size": args.body_size,
        "duration_s": round(elapsed, 3),
        "requests": sent,
        "completed": len(lat),
        "errors": results.errors,
        "achieved_rate": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "statuses": {str(k): v for k, v in sorted(results.statuses.items())},
        "latency_ms": {f"p{p:g}": round(percentile(lat, p), 3) for p in PERCENTILES},
    }
    out["latency_ms"]["max"] = round(lat[-1] / 1e6, 3) if lat else math.nan
    if args.samples:
        out["samples_ms"] = [round(x / 1e6, 3) for x in lat[:: max(1, len(lat) // 2000)]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rate", type=float, default=100.0, help="requests/s; 0 = maximum")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--streams", type=int, default=32, help="HTTP/2 streams per connection")
    p.add_argument("--http2", action="store_true", help="HTTP/2 prior knowledge (h2c)")
    p.add_argument("--body-size", type=int, default=0, help="request body bytes (POST)")
    p.add_argument("--samples", action="store_true", help="include a latency sample list")
    args = p.parse_args(argv)
    if args.rate < 0 or args.duration <= 0 or args.connections < 1:
        p.error("--rate must be >= 0, --duration > 0, --connections >= 1")
    args.drain_ns = int(5e9)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        out = asyncio.run(run(args))
    except OSError as exc:
        print(f"loadgen: {args.url}: {exc}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
