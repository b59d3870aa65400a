"""The backend pod tests put behind a waypoint: the lab's HTTP echo (`mesh.apps.echo.HttpEcho`,
whose JSON answer says which pod answered and what the request looked like), misbehaving on
request the ways a proxy in front of it must cope with.

Every answer carries `x-pod`. Paths that misbehave:
`/status/N` answers N; `/delay/MS` answers late; `/flaky/N/KEY` is 503 for the first N requests
of KEY; `/reset` resets the connection (RST) instead of answering, `/reset-once/KEY` the first
time only; `/drop-second` closes without answering when it is not the connection's first
request (a backend closing an idle keep-alive connection, as a request races the close);
`/then-close` answers, then closes the idle connection; `/stall-body/MS` sends the head and half
the body, the rest MS later; `/echo-body` streams the request body back as it arrives (chunked,
with an `x-body-len` trailer); `/slow` never answers (until the connection goes);
`/bad-response` answers with a smuggling-shaped response (Content-Length and
Transfer-Encoding). `BackendStats` counts what arrived, so a test can see what a proxy sent
on, retried, or cancelled.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field

from mesh.apps.echo import HttpEcho


@dataclass
class BackendStats:
    connections: int = 0
    requests: int = 0  # complete requests
    dropped: int = 0  # requests reset or closed instead of answered
    serving: int = 0  # `/slow` requests whose connection is still open
    counters: dict[str, int] = field(default_factory=dict)  # per path, for /flaky, /reset-once
    paths: list[str] = field(default_factory=list)  # every request's path, in order

    def bump(self, key: str) -> int:
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key]


class Backend(HttpEcho):
    """One connection of a backend pod's HTTP/1.1 server."""

    def __init__(self, pod: str, stats: BackendStats, namespace: str = "") -> None:
        super().__init__({"pod": pod, "namespace": namespace})
        self.pod = pod
        self.stats = stats
        self.served = 0
        self.streaming = False
        self.slow = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slow:
            self.slow = False
            self.stats.serving -= 1

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.streaming = False

    def on_headers_complete(self) -> None:
        path = self._url.decode()
        t = self._transport
        assert t is not None
        if path == "/drop-second" and self.served:
            self.stats.dropped += 1
            t.close()
        elif path == "/reset" or (path.startswith("/reset-once/") and self.stats.bump(path) == 1):
            self.stats.dropped += 1
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            t.abort()
        elif path == "/echo-body":
            self.streaming = True
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-pod: %s\r\n\r\n" % (
                self.pod.encode()
            ))  # fmt: skip

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.streaming and self._transport is not None:
            self._transport.write(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        path = self._url.decode()
        self.stats.requests += 1
        self.stats.paths.append(path)
        self.served += 1
        if self.streaming:
            t.write(b"0\r\nx-body-len: %d\r\n\r\n" % self._body_len)
            return
        parts = path.split("?")[0].split("/")
        status, delay = 200, 0.0
        if path == "/slow":
            self.slow = True
            self.stats.serving += 1
            return
        if path == "/bad-response":
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
            )
            return
        if len(parts) >= 3 and parts[1] == "status":
            status = int(parts[2])
        elif len(parts) >= 3 and parts[1] == "delay":
            delay = int(parts[2]) / 1000
        elif len(parts) >= 4 and parts[1] == "flaky" and self.stats.bump(path) <= int(parts[2]):
            status = 503
        loop = asyncio.get_running_loop()
        if len(parts) >= 3 and parts[1] == "stall-body":  # the head and half, the rest later
            payload = json.dumps(self.describe()).encode()
            cut = len(payload) // 2
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"x-pod: %s\r\n\r\n%s" % (len(payload), self.pod.encode(), payload[:cut])
            )
            loop.call_later(int(parts[2]) / 1000, self._late, payload[cut:])
            return
        if path == "/then-close":  # answer, keep alive, then close while idle
            loop.call_later(0.05, t.close)
        if delay:
            loop.call_later(delay, self._answer, status, self.describe())
        else:
            self._answer(status, self.describe())

    def _answer(self, status: int, info: dict[str, object]) -> None:
        payload = json.dumps(info).encode()
        self._reply(status, payload, close=False, headers=[("x-pod", self.pod)])

    def _late(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
