"""The waypoint's RequestHandler (waypoint.request) driven with bytes: retries, timeouts,
request-body replay and mirrors, with no socket and no TLS.

The whole request path is the real one: a client's HTTP/1.1 bytes go into `serve_stream` (the
waypoint's H1Server), the handler routes them through the real `Upstreams` and its HTTP/1.1 or
HTTP/2 client, and the backend pods are the waypoint's own H1Server/H2Server answering from a
script. The only stand-in is the HBONE pool, at the one call `Upstreams` makes of it
(`connect`): each CONNECT becomes an in-memory byte stream to the pod's server. So what these
tests assert is what the client and the backend see on the wire, plus the access-log line and
the request metric the handler writes, which is what an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import httptools
import pytest

from mesh.config.parse import parse_objects
from mesh.config.snapshot import NO_POLICIES
from mesh.hbone import HbonePool
from mesh.identity.spiffe import node_id
from mesh.metrics import MeshMetrics
from mesh.ports import HBONE_PORT
from mesh.stream import Endpoint, EndpointState
from waypoint.h1 import H1Server, H1ServerExchange
from waypoint.h2 import H2Server, H2ServerExchange
from waypoint.inbound import serve_stream
from waypoint.request import RequestHandler, StreamContext
from waypoint.service import ServiceRoutes
from waypoint.upstream import Upstreams
from waypoint.wire import ResponseHead

Doc = dict[str, Any]
Exchange = H1ServerExchange | H2ServerExchange
Script = Callable[[Exchange, int], Awaitable[None]]

NS = "shop"
ECHO_VIP = "10.96.0.10"
GRPC_VIP = "10.96.0.20"
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"
WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"
PODS = {"echo-v1": "10.1.0.3", "echo-v2": "10.1.0.4", "grpc": "10.1.0.5"}


def manifest() -> list[Doc]:
    def pod(name: str, labels: dict[str, str]) -> Doc:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": "n2", "serviceAccountName": name},
            "status": {"podIP": PODS[name]},
        }

    def svc(name: str, vip: str, selector: dict[str, str], port: Doc) -> Doc:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": vip, "selector": selector, "ports": [port]},
        }

    http = {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}
    grpc = {"name": "grpc", "port": 50051, "targetPort": 50051, "appProtocol": "grpc"}
    amb = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": amb}},
        pod("echo-v1", {"app": "echo", "version": "v1"}),
        pod("echo-v2", {"app": "echo", "version": "v2"}),
        pod("grpc", {"app": "grpc"}),
        svc("echo", ECHO_VIP, {"app": "echo"}, http),
        svc("echo-v1", "10.96.0.11", {"app": "echo", "version": "v1"}, http),
        svc("echo-v2", "10.96.0.12", {"app": "echo", "version": "v2"}, http),
        svc("gone", "10.96.0.13", {"app": "nothing"}, http),
        svc("grpc", GRPC_VIP, {"app": "grpc"}, grpc),
    ]  # fmt: skip


def route(
    *,
    parent: str = "echo",
    backend: str = "echo-v1",
    port: int = 80,
    attempts: int = 0,
    codes: Sequence[int] = (),
    timeouts: dict[str, str] | None = None,
    mirror: str | None = None,
) -> Doc:
    rule: Doc = {
        "backendRefs": [{"name": backend, "port": port}],
        "retry": {"attempts": attempts, "codes": list(codes), "backoff": "1ms"},
    }
    if timeouts:
        rule["timeouts"] = timeouts
    if mirror:
        rule["filters"] = [
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": mirror, "port": 80}}}
        ]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}], "rules": [rule]},
    }


async def turns_until(cond: Callable[[], bool], n: int = 200) -> None:
    """Loop turns (no wall-clock wait) until `cond`: in-memory bytes travel by call_soon."""
    for _ in range(n):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


# -- the in-memory wire ------------------------------------------------------------------------


class PipeEnd(EndpointState):
    """One end of an in-memory byte stream standing in for an HBONE CONNECT stream. Bytes, EOF
    and resets reach the other end on a later loop turn, as from a real transport (so neither
    codec is re-entered from inside its own write)."""

    def __init__(self) -> None:
        super().__init__()
        self.other: PipeEnd = self
        self.peer: Endpoint | None = None
        self.early: list[bytes | None] = []
        self.lost = False

    def join(self, peer: Endpoint) -> None:
        self.peer = peer
        for item in self.early:
            self._arrive(item)
        self.early.clear()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.lost:
            self._sent += len(data)
            asyncio.get_running_loop().call_soon(self.other._arrive, bytes(data))

    def write_eof(self) -> None:
        if not self.lost:
            asyncio.get_running_loop().call_soon(self.other._arrive, None)

    def abort(self) -> None:
        if not self.lost:
            self._lose()
            asyncio.get_running_loop().call_soon(self.other._aborted)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def _lose(self) -> None:
        self.lost = True
        if not self._done.done():
            self._done.set_result(None)

    def _arrive(self, data: bytes | None) -> None:
        if self.lost:
            return
        if self.peer is None:
            self.early.append(data)
        elif data is None:
            self.peer.write_eof()
        else:
            self._recv += len(data)
            self.peer.write(data)

    def _aborted(self) -> None:
        if not self.lost:
            self._lose()
            if self.peer is not None:
                self.peer.abort()


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a, b = PipeEnd(), PipeEnd()
    a.other, b.other = b, a
    return a, b


@dataclass
class Seen:
    method: str
    target: str
    body: bytes


class Backend:
    """One pod: the waypoint's own HTTP server, answering each request with `script(ex, n)`
    (n counts the requests this pod has seen) after reading the whole request body."""

    def __init__(self, protocol: str = "http/1.1") -> None:
        self.protocol = protocol
        self.script: Script = answer(200, b"ok")
        self.requests: list[Seen] = []
        self.connections = 0
        self.cancelled = 0  # handlers cut short because the waypoint reset the stream

    async def serve(self, ex: Exchange) -> None:
        n = len(self.requests)
        seen = Seen(ex.head.method, ex.head.target, b"")
        self.requests.append(seen)
        try:
            while chunk := await ex.body.read():
                seen.body += chunk
            await self.script(ex, n)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def answer(status: int, body: bytes = b"") -> Script:
    async def script(ex: Exchange, n: int) -> None:
        await ex.send_head(ResponseHead(status, [("content-length", str(len(body)))]), body)
        await ex.finish()

    return script


def sequence(*scripts: Script) -> Script:
    """The n-th request gets the n-th script; the last one repeats."""

    async def script(ex: Exchange, n: int) -> None:
        await scripts[min(n, len(scripts) - 1)](ex, n)

    return script


async def reset(ex: Exchange, n: int) -> None:
    """The connection (HTTP/1.1) or stream (HTTP/2) reset before any response byte."""
    ex.reset()


async def stall(ex: Exchange, n: int) -> None:
    await asyncio.Event().wait()


async def head_then_stall(ex: Exchange, n: int) -> None:
    await ex.send_head(ResponseHead(200, [("content-type", "text/plain")]), b"part")
    await asyncio.Event().wait()


class MemPool:
    """Stands in for `HbonePool` at the one call `Upstreams` makes of it: each CONNECT is a
    new in-memory stream to the server of the pod its `:authority` names."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self.backends = backends
        self.connects: list[tuple[str, tuple[str, int], str, frozenset[str] | None]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(
        self,
        source_identity: str,
        address: tuple[str, int],
        authority: str,
        *,
        expected_peers: frozenset[str] | None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Endpoint:
        self.connects.append((source_identity, address, authority, expected_peers))
        backend = self.backends[authority.rpartition(":")[0]]
        backend.connections += 1
        near, far = pipe()
        loop = asyncio.get_running_loop()
        if backend.protocol == "h2":
            h2s = H2Server(backend.serve)
            h2s.join(far)
            h2s.start()
            far.join(h2s)
            self.tasks.append(loop.create_task(h2s.run()))
        else:
            h1s = H1Server(backend.serve)
            far.join(h1s)
            h1s.join(far)
            self.tasks.append(loop.create_task(h1s.run()))
        return near


# -- the client side ---------------------------------------------------------------------------


class Downstream(EndpointState):
    """The client's end of a downstream connection (an accepted CONNECT stream): what the
    waypoint writes back, and whether it closed or reset the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.peer: Endpoint | None = None
        self.out = bytearray()
        self.eof = False
        self.aborted = False
        self.changed = asyncio.Event()

    def join(self, peer: Endpoint) -> None:
        self.peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data
        self.changed.set()

    def write_eof(self) -> None:
        self.eof = True
        self.changed.set()

    def abort(self) -> None:
        self.aborted = True
        self.changed.set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def send(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.write(data)


@dataclass
class Response:
    """One HTTP/1.1 response as the client parsed it, and how the connection ended."""

    status: int = 0
    body: bytes = b""
    complete: bool = False  # the whole message arrived (not cut)
    reset: bool = False  # the waypoint reset the connection
    headers: list[tuple[str, str]] = field(default_factory=list)
    parser: Any = None  # the httptools parser feeding this response

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class Rig:
    """A RequestHandler over real Upstreams, the pods of `manifest()` as in-memory backends,
    and the access log and metrics it writes."""

    def __init__(self, extra: list[Doc], *, retry_buffer: int = 1 << 20) -> None:
        self.snap = parse_objects([*manifest(), *extra])
        self.pods = {
            "echo-v1": Backend(),
            "echo-v2": Backend(),
            "grpc": Backend("h2"),
        }
        self.pool = MemPool({PODS[name]: b for name, b in self.pods.items()})
        # Upstreams uses nothing of the pool but `connect`.
        self.upstreams = Upstreams(cast(HbonePool, self.pool), WAYPOINT_ID, lambda: self.snap)
        self.metrics = MeshMetrics()
        self.handler = RequestHandler(
            self.upstreams, self.metrics, rng=random.Random(1), retry_buffer=retry_buffer
        )
        self.access: list[dict[str, Any]] = []
        self._log = logging.getLogger("mesh.access")
        self._level = self._log.level
        self._capture = _Capture(self.access)
        self._log.addHandler(self._capture)
        self._log.setLevel(logging.INFO)

    def ctx(self, vip: str, port: int) -> StreamContext:
        sr = ServiceRoutes(self.snap)
        found = sr.for_authority(f"{vip}:{port}", NS)
        assert found is not None
        svc, port, table = found
        return StreamContext(CLIENT_ID, "10.1.0.1", svc, port, sr, table, NO_POLICIES, NS)

    async def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        body: Sequence[bytes] = (),
        chunked: bool = False,
        vip: str = ECHO_VIP,
        port: int = 80,
    ) -> Response:
        """One request on a new downstream connection; `body` is sent in as many writes as it
        has parts, a loop turn apart."""
        down = Downstream()
        served = asyncio.get_running_loop().create_task(
            serve_stream(down, self.ctx(vip, port), self.handler)
        )
        await turns_until(lambda: down.peer is not None)
        framing = (
            "transfer-encoding: chunked" if chunked else f"content-length: {sum(map(len, body))}"
        )
        head = f"{method} {path} HTTP/1.1\r\nhost: echo.{NS}.svc.cluster.local\r\n{framing}\r\n\r\n"
        down.send(head.encode())
        for part in body:
            await asyncio.sleep(0)
            down.send(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
        if chunked:
            down.send(b"0\r\n\r\n")
        resp = Response()
        parser = resp.parser = httptools.HttpResponseParser(resp)
        seen = 0
        async with asyncio.timeout(5):
            while True:
                if len(down.out) > seen:
                    parser.feed_data(bytes(down.out[seen:]))
                    seen = len(down.out)
                if resp.complete or down.aborted or down.eof:
                    break
                down.changed.clear()
                await down.changed.wait()
            resp.reset = down.aborted
            if not down.aborted:
                assert down.peer is not None
                down.peer.write_eof()
            await served
        return resp

    def requests_total(self, **labels: str) -> float:
        text = self.metrics.exposition().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("istio_requests_total{") and all(
                f'{k}="{v}"' in line for k, v in labels.items()
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def close(self) -> None:
        self._log.removeHandler(self._capture)
        self._log.setLevel(self._level)
        await self.handler.close()
        self.upstreams.close()
        for _ in range(5):
            await asyncio.sleep(0)  # EOFs and resets reach the backends
        for t in self.pool.tasks:
            t.cancel()
        if self.pool.tasks:
            await asyncio.wait(self.pool.tasks)


class _Capture(logging.Handler):
    def __init__(self, into: list[dict[str, Any]]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(json.loads(record.getMessage()))


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def build(extra: list[Doc], **kw: Any) -> Rig:
        wp = Rig(extra, **kw)
        made.append(wp)
        return wp

    try:
        yield build
    finally:
        for wp in made:
            await wp.close()


def outcome(wp: Rig) -> tuple[int, str]:
    """The one access-log line's status and response flags."""
    (line,) = wp.access
    return line["status"], line["response_flags"]


# -- retries -----------------------------------------------------------------------------------


async def test_503_is_retried_and_the_next_answer_forwarded(make: Callable[..., Rig]) -> None:
    wp = make([route(attempts=2, codes=[503])])
    v1 = wp.pods["echo-v1"]
    v1.script = sequence(answer(503, b"busy"), answer(200, b"fine"))
    r = await wp.request("/a")
    assert (r.status, r.body, r.complete) == (200, b"fine", True)
    assert [s.target for s in v1.requests] == ["/a", "/a"]
    assert outcome(wp) == (200, "-")
    assert wp.access[0]["dst.addr"] == f"{PODS['echo-v1']}:8080"
    # Each try is a CONNECT as the waypoint, to the pod through its node's ztunnel.
    node = frozenset({node_id("cluster.local", "n2")})
    hop = (WAYPOINT_ID, ("10.0.0.2", HBONE_PORT), f"{PODS['echo-v1']}:8080", node)
    # The 503 is dropped unread, so its connection is reset and the retry opens another.
    assert wp.pool.connects == [hop, hop] and v1.connections == 2
    assert wp.requests_total(response_code="200", response_flags="-") == 1
    assert wp.requests_total(response_code="503") == 0  # a retried answer is not a request


async def test_connection_reset_before_the_head_is_retried(make: Callable[..., Rig]) -> None:
    wp = make([route(attempts=2, codes=[503])])
    v1 = wp.pods["echo-v1"]
    v1.script = sequence(reset, answer(200, b"fine"))
    r = await wp.request("/b")
    assert (r.status, r.body) == (200, b"fine")
    assert len(v1.requests) == 2
    assert v1.connections == 2  # the reset connection is never reused
    assert outcome(wp) == (200, "-")
    assert wp.requests_total(response_code="200", response_flags="-") == 1


async def test_reset_of_an_h2_stream_is_retried_on_the_same_connection(
    make: Callable[..., Rig],
) -> None:
    """HTTP/2 upstream: RST_STREAM fails only that stream; the retry rides the same
    connection."""
    wp = make([route(parent="grpc", backend="grpc", port=50051, attempts=1, codes=[503])])
    pod = wp.pods["grpc"]
    pod.script = sequence(reset, answer(200, b"fine"))
    r = await wp.request("/pkg.Svc/Call", method="POST", body=[b"msg"], vip=GRPC_VIP, port=50051)
    assert (r.status, r.body) == (200, b"fine")
    assert [s.body for s in pod.requests] == [b"msg", b"msg"]
    assert pod.connections == 1
    assert outcome(wp) == (200, "-")


async def test_retries_stop_at_the_routes_limit(make: Callable[..., Rig]) -> None:
    wp = make([route(attempts=2, codes=[503])])
    v1 = wp.pods["echo-v1"]
    v1.script = answer(503, b"busy")
    r = await wp.request("/c")
    assert (r.status, r.body) == (503, b"busy")  # the last answer, as the backend gave it
    assert len(v1.requests) == 3  # the first try and two retries
    assert outcome(wp) == (503, "-")
    assert wp.requests_total(response_code="503", response_flags="-") == 1


async def test_resets_past_the_limit_are_a_503_flagged_UR(make: Callable[..., Rig]) -> None:
    wp = make([route(attempts=1, codes=[503])])
    v1 = wp.pods["echo-v1"]
    v1.script = reset
    r = await wp.request("/d")
    assert r.status == 503 and b"upstream reset before response headers" in r.body
    assert len(v1.requests) == 2
    assert outcome(wp) == (503, "UR")
    assert wp.requests_total(response_code="503", response_flags="UR") == 1


async def test_codes_not_listed_are_not_retried(make: Callable[..., Rig]) -> None:
    wp = make([route(attempts=3, codes=[502])])
    v1 = wp.pods["echo-v1"]
    v1.script = answer(503, b"busy")
    r = await wp.request("/e")
    assert r.status == 503 and len(v1.requests) == 1


async def test_request_body_is_replayed_on_retry(make: Callable[..., Rig]) -> None:
    """A chunked body arriving in parts: the first try streams it as it comes, the retry gets
    it whole from the replay buffer."""
    wp = make([route(attempts=1, codes=[503])])
    v1 = wp.pods["echo-v1"]

    async def echo(ex: Exchange, n: int) -> None:
        await answer(200, v1.requests[n].body)(ex, n)

    v1.script = sequence(answer(503), echo)
    parts = [b"first part;", b"second part;", b"third"]
    r = await wp.request("/up", method="POST", body=parts, chunked=True)
    assert (r.status, r.body) == (200, b"".join(parts))
    assert [s.body for s in v1.requests] == [b"".join(parts)] * 2
    assert outcome(wp) == (200, "-")
    assert wp.access[0]["bytes_sent"] == len(b"".join(parts))  # counted once, not per try


@pytest.mark.parametrize("first", [answer(503, b"busy"), reset], ids=["503", "reset"])
async def test_body_past_the_replay_buffer_is_not_retried(
    make: Callable[..., Rig], first: Script
) -> None:
    """Past `retry_buffer` the body is no longer held, so it cannot be sent again: the first
    try's outcome is final (the backend's 503, or a 503 UR for a reset)."""
    wp = make([route(attempts=3, codes=[503])], retry_buffer=1024)
    v1 = wp.pods["echo-v1"]
    v1.script = sequence(first, answer(200, b"fine"))
    body = bytes(4096)
    r = await wp.request("/big", method="PUT", body=[body])
    assert r.status == 503
    assert [s.body for s in v1.requests] == [body]  # the whole body went out, once
    assert wp.access[0]["retry_skipped"] == "body exceeds 1024 bytes retry buffer"
    if first is reset:
        assert b"upstream reset before response headers" in r.body
        assert outcome(wp) == (503, "UR")
    else:
        assert r.body == b"busy"
        assert outcome(wp) == (503, "-")


async def test_body_within_the_replay_buffer_is_retried(make: Callable[..., Rig]) -> None:
    """The same request as above with the body under the limit: retried (so the limit, not
    the size alone, is what stops the retry above)."""
    wp = make([route(attempts=3, codes=[503])], retry_buffer=8192)
    v1 = wp.pods["echo-v1"]
    v1.script = sequence(answer(503, b"busy"), answer(200, b"fine"))
    r = await wp.request("/big", method="PUT", body=[bytes(4096)])
    assert r.status == 200 and len(v1.requests) == 2


# -- timeouts ----------------------------------------------------------------------------------


async def test_backend_request_timeout_before_the_head_is_504_UT(
    make: Callable[..., Rig],
) -> None:
    wp = make([route(timeouts={"backendRequest": "50ms"})])
    v1 = wp.pods["echo-v1"]
    v1.script = stall
    r = await wp.request("/slow")
    assert (r.status, r.body, r.complete) == (504, b"upstream request timeout\n", True)
    assert outcome(wp) == (504, "UT")
    assert wp.requests_total(response_code="504", response_flags="UT") == 1
    await turns_until(lambda: v1.cancelled == 1)  # the attempt's stream was reset


async def test_request_timeout_covers_the_retries(make: Callable[..., Rig]) -> None:
    """Each try times out (backendRequest) and is retried, until the whole request's time is
    up: then 504 UT, long before the 100 retries the route allows."""
    timeouts = {"request": "500ms", "backendRequest": "50ms"}
    wp = make([route(attempts=100, codes=[504], timeouts=timeouts)])
    v1 = wp.pods["echo-v1"]
    v1.script = stall
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await wp.request("/slow")
    assert (r.status, r.body) == (504, b"upstream request timeout\n")
    assert 2 <= len(v1.requests) < 100
    assert loop.time() - t0 < 3.0
    assert outcome(wp) == (504, "UT")


@pytest.mark.parametrize("key", ["request", "backendRequest"])
async def test_timeout_after_the_head_cuts_the_response(make: Callable[..., Rig], key: str) -> None:
    """The head and part of the body went out, then the backend stalls: the client sees the
    response break off (the connection reset), flagged UT; nothing is retried."""
    wp = make([route(attempts=2, codes=[504], timeouts={key: "100ms"})])
    v1 = wp.pods["echo-v1"]
    v1.script = head_then_stall
    r = await wp.request("/stall")
    assert (r.status, r.body) == (200, b"part")
    assert r.reset and not r.complete
    assert len(v1.requests) == 1
    assert outcome(wp) == (200, "UT")
    assert wp.requests_total(response_code="200", response_flags="UT") == 1
    await turns_until(lambda: v1.cancelled == 1)


async def test_no_timeout_lets_a_slow_response_finish(make: Callable[..., Rig]) -> None:
    """The same stalling backend without a timeout: the response waits for it (so the cuts
    above are the timeouts' doing)."""
    wp = make([route()])
    v1 = wp.pods["echo-v1"]
    go = asyncio.Event()

    async def slow(ex: Exchange, n: int) -> None:
        await ex.send_head(ResponseHead(200, []), b"part")
        await go.wait()
        await ex.send_data(b"-rest")
        await ex.finish()

    v1.script = slow
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, go.set)
    r = await wp.request("/slow")
    assert (r.status, r.body, r.complete) == (200, b"part-rest", True)
    assert outcome(wp) == (200, "-")


async def test_cut_response_on_h2_resets_only_that_stream(make: Callable[..., Rig]) -> None:
    """An HTTP/2 client: the response cut at the deadline is a RST_STREAM of its stream, and
    the connection goes on serving the client's next request."""
    wp = make([route(timeouts={"request": "100ms"})])
    v1 = wp.pods["echo-v1"]
    v1.script = sequence(head_then_stall, answer(200, b"ok"))
    down = Downstream()
    served = asyncio.get_running_loop().create_task(
        serve_stream(down, wp.ctx(ECHO_VIP, 80), wp.handler)
    )
    await turns_until(lambda: down.peer is not None)
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    peer.initiate_connection()
    events: list[Any] = []

    async def until(cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while True:
                if data := peer.data_to_send():
                    down.send(data)
                if down.out:
                    out = bytes(down.out)
                    down.out.clear()
                    events.extend(peer.receive_data(out))
                    continue
                if cond():
                    return
                down.changed.clear()
                await down.changed.wait()

    def get(path: str) -> int:
        sid: int = peer.get_next_available_stream_id()
        hs = [(":method", "GET"), (":scheme", "http"), (":path", path),
              (":authority", f"echo.{NS}.svc.cluster.local")]  # fmt: skip
        peer.send_headers(sid, hs, end_stream=True)
        return sid

    def on(sid: int, kind: type[Any]) -> list[Any]:
        return [e for e in events if isinstance(e, kind) and e.stream_id == sid]

    first = get("/cut")
    await until(lambda: bool(on(first, h2.events.StreamReset)))
    (head,) = on(first, h2.events.ResponseReceived)
    assert dict(head.headers)[":status"] == "200"
    assert b"".join(e.data for e in on(first, h2.events.DataReceived)) == b"part"
    assert not on(first, h2.events.StreamEnded)
    second = get("/again")
    await until(lambda: bool(on(second, h2.events.StreamEnded)))
    assert b"".join(e.data for e in on(second, h2.events.DataReceived)) == b"ok"
    assert not [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [(a["path"], a["status"], a["response_flags"]) for a in wp.access] == [
        ("/cut", 200, "UT"),
        ("/again", 200, "-"),
    ]
    peer.close_connection()
    down.send(peer.data_to_send())
    assert down.peer is not None
    down.peer.write_eof()
    async with asyncio.timeout(5):
        await served


# -- mirrors -----------------------------------------------------------------------------------


async def test_mirror_gets_a_copy_of_the_request(make: Callable[..., Rig]) -> None:
    wp = make([route(mirror="echo-v2")])
    v1, v2 = wp.pods["echo-v1"], wp.pods["echo-v2"]
    v2.script = answer(500, b"ignored")
    r = await wp.request("/m?x=1", method="POST", body=[b"copy ", b"me"])
    assert (r.status, r.body) == (200, b"ok")
    assert [(s.method, s.target, s.body) for s in v1.requests] == [("POST", "/m?x=1", b"copy me")]
    await turns_until(lambda: bool(v2.requests))
    assert [(s.method, s.target, s.body) for s in v2.requests] == [("POST", "/m?x=1", b"copy me")]
    assert outcome(wp) == (200, "-")  # one request, one line: the mirror is not accounted


@pytest.mark.parametrize(
    "mirror, script",
    [("echo-v2", reset), ("echo-v2", stall), ("echo-v2", answer(503)), ("gone", None)],
    ids=["reset", "stall", "503", "no-endpoints"],
)
async def test_mirror_failure_never_affects_the_main_response(
    make: Callable[..., Rig], mirror: str, script: Script | None
) -> None:
    wp = make([route(mirror=mirror, attempts=2, codes=[503])])
    v1, v2 = wp.pods["echo-v1"], wp.pods["echo-v2"]
    if script is not None:
        v2.script = script
    r = await wp.request("/m", method="POST", body=[b"data"])
    assert (r.status, r.body, r.complete) == (200, b"ok", True)
    assert len(v1.requests) == 1
    if script is not None:
        await turns_until(lambda: bool(v2.requests))
    # A second request on the waypoint is untouched by the first one's mirror.
    r2 = await wp.request("/n")
    assert (r2.status, r2.body) == (200, b"ok")
    assert [(a["status"], a["response_flags"]) for a in wp.access] == [(200, "-"), (200, "-")]
    assert wp.requests_total() == 2
    assert wp.requests_total(response_code="200", response_flags="-") == 2
