"""The waypoint's HTTP/2 (waypoint.h2) driven with bytes from a real h2 peer over an in-memory
wire: a real event loop, no socket. What a client or backend sees on the wire is what these
tests assert: answers, trailers, flow-control credit, refusals and the flood defences."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from mesh.stream import Endpoint, EndpointState
from waypoint.h2 import STREAM_WINDOW, H2Client, H2Conn, H2Server, H2ServerExchange
from waypoint.limits import Limits, Refusal
from waypoint.wire import RequestHead, ResponseHead, StreamReset

Handler = Callable[[H2ServerExchange], Awaitable[None]]


class Wire(EndpointState):
    """The far end of the connection's byte stream: keeps what the connection writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.eof = False
        self.aborted = False

    def join(self, peer: Endpoint) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def write_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Link:
    """One waypoint connection (`conn`), its wire, and the h2 peer at the other end."""

    def __init__(self, conn: H2Conn, *, peer_is_client: bool) -> None:
        self.conn = conn
        self.wire = Wire()
        self.peer = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=peer_is_client, header_encoding="utf-8")
        )
        conn.join(self.wire)
        conn.start()
        self.peer.initiate_connection()

    def to_conn(self) -> None:
        data = self.peer.data_to_send()
        if data:
            self.conn.write(data)

    def to_peer(self) -> list[Any]:
        out = bytes(self.wire.out)
        self.wire.out.clear()
        return self.peer.receive_data(out) if out else []

    async def exchange(self) -> list[Any]:
        """Peer's bytes in, a few loop turns (handlers run, flushes happen), our bytes out."""
        self.to_conn()
        await turns()
        return self.to_peer()


def of(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def hdrs(ev: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in ev.headers}


def request(
    path: str = "/", method: str = "GET", extra: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":authority", "svc.ns.svc.cluster.local"),
        (":path", path),
        *(extra or []),
    ]


def server(handler: Handler, limits: Limits | None = None) -> tuple[Link, H2Server, list[Refusal]]:
    refusals: list[Refusal] = []
    srv = H2Server(handler, limits, refusals.append)
    return Link(srv, peer_is_client=True), srv, refusals


async def settled(link: Link) -> None:
    await link.exchange()
    await link.exchange()


async def test_request_answered_with_body_and_trailers() -> None:
    seen: list[RequestHead] = []

    async def handler(ex: H2ServerExchange) -> None:
        seen.append(ex.head)
        body = b""
        while chunk := await ex.body.read():
            body += chunk
        await ex.send_head(ResponseHead(200, [("content-type", "text/plain")]), b"got " + body)
        await ex.finish([("grpc-status", "0")])

    link, srv, _ = server(handler)
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    extra = [("x-user", "alice"), ("te", "trailers")]
    link.peer.send_headers(sid, request("/items?a=1", "POST", extra))
    link.peer.send_data(sid, b"hello", end_stream=True)
    events = await link.exchange()
    (head,) = seen
    assert (head.method, head.target, head.authority) == (
        "POST",
        "/items?a=1",
        "svc.ns.svc.cluster.local",
    )
    assert ("x-user", "alice") in head.headers and head.te_trailers
    (resp,) = of(events, h2.events.ResponseReceived)
    assert hdrs(resp) == {":status": "200", "content-type": "text/plain"}
    assert b"".join(e.data for e in of(events, h2.events.DataReceived)) == b"got hello"
    (trailers,) = of(events, h2.events.TrailersReceived)
    assert hdrs(trailers) == {"grpc-status": "0"}
    assert of(events, h2.events.StreamEnded)
    assert srv.opened == 1 and srv.streams == {}


async def test_request_body_credit_follows_the_reader() -> None:
    """DATA is credited back only once the handler has taken it: the window is the
    back-pressure towards the client."""
    gate = asyncio.Event()
    got: list[int] = []

    async def handler(ex: H2ServerExchange) -> None:
        await gate.wait()
        n = 0
        while chunk := await ex.body.read():
            n += len(chunk)
        got.append(n)
        await ex.send_head(ResponseHead(204, [], end_stream=True))

    link, _, _ = server(handler)
    await settled(link)
    assert link.peer.remote_settings.initial_window_size == STREAM_WINDOW
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request(method="PUT"))
    size = 600_000  # over half the window: h2 sends WINDOW_UPDATE from there
    for off in range(0, size, 16_384):
        link.peer.send_data(sid, bytes(min(16_384, size - off)))
    events = await link.exchange()
    assert [e for e in of(events, h2.events.WindowUpdated) if e.stream_id == sid] == []
    assert link.peer.local_flow_control_window(sid) == STREAM_WINDOW - size
    gate.set()
    await turns()
    events = link.to_peer()
    credited = sum(e.delta for e in of(events, h2.events.WindowUpdated) if e.stream_id == sid)
    assert credited == size
    link.peer.end_stream(sid)
    events = await link.exchange()
    assert got == [size]
    assert hdrs(of(events, h2.events.ResponseReceived)[0])[":status"] == "204"


async def test_response_never_exceeds_the_clients_window() -> None:
    size = 200_000

    async def handler(ex: H2ServerExchange) -> None:
        await ex.send_head(ResponseHead(200, []), bytes(size))
        await ex.finish()

    link, _, _ = server(handler)
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request(), end_stream=True)
    events = await link.exchange()
    first = sum(len(e.data) for e in of(events, h2.events.DataReceived))
    assert first == 65535  # the client's default stream window, never more
    assert not of(events, h2.events.StreamEnded)
    link.peer.increment_flow_control_window(size)
    link.peer.increment_flow_control_window(size, stream_id=sid)
    events = await link.exchange()
    assert first + sum(len(e.data) for e in of(events, h2.events.DataReceived)) == size
    assert of(events, h2.events.StreamEnded)


async def test_whole_body_at_hand_ends_on_its_own_data_frame() -> None:
    """`send_head(..., last=True)`: the body's DATA frame carries END_STREAM (no empty DATA
    frame after it), also when the client's window splits the body; an empty body ends on
    the HEADERS frame."""
    size = 70_000  # over the client's default windows of 65,535

    async def handler(ex: H2ServerExchange) -> None:
        body = (
            b"hi"
            if ex.head.target == "/small"
            else b""
            if ex.head.target == "/empty"
            else bytes(size)
        )
        await ex.send_head(ResponseHead(200, []), body, last=True)
        assert ex.finished
        await ex.finish()  # a no-op now

    link, srv, _ = server(handler)
    await settled(link)
    frames: list[tuple[int, bool]] = []  # (DATA length, END_STREAM) per frame, in order
    raw = link.peer.receive_data

    def spy(data: bytes) -> list[Any]:
        events = raw(data)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                frames.append((len(e.data), e.stream_ended is not None))
        return events

    link.peer.receive_data = spy  # type: ignore[method-assign,assignment]
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request("/small"), end_stream=True)
    events = await link.exchange()
    assert frames == [(2, True)] and of(events, h2.events.StreamEnded)
    frames.clear()
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request("/empty"), end_stream=True)
    events = await link.exchange()
    (resp,) = of(events, h2.events.ResponseReceived)
    assert frames == [] and resp.stream_ended is not None
    frames.clear()
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request("/big"), end_stream=True)
    await link.exchange()
    assert 0 < sum(n for n, _ in frames) < size and not any(end for _, end in frames)
    link.peer.increment_flow_control_window(size)
    link.peer.increment_flow_control_window(size, stream_id=sid)
    await link.exchange()
    assert sum(n for n, _ in frames) == size
    assert frames[-1][1] and [end for _, end in frames].count(True) == 1
    await settled(link)
    assert srv.streams == {}


async def test_stream_past_the_limit_is_refused_and_the_connection_kept() -> None:
    hold = asyncio.Event()

    async def handler(ex: H2ServerExchange) -> None:
        await hold.wait()
        await ex.send_head(ResponseHead(200, [], end_stream=True))

    link, srv, refusals = server(handler, Limits(max_concurrent_streams=2))
    await settled(link)
    assert link.peer.remote_settings.max_concurrent_streams == 2
    link.peer.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
    link.peer.remote_settings.acknowledge()
    sids = []
    for _ in range(3):
        sid = link.peer.get_next_available_stream_id()
        link.peer.send_headers(sid, request(), end_stream=True)
        sids.append(sid)
    events = await link.exchange()
    resets = [(e.stream_id, e.error_code) for e in of(events, h2.events.StreamReset)]
    assert resets == [(sids[2], h2.errors.ErrorCodes.REFUSED_STREAM)]
    assert not of(events, h2.events.ConnectionTerminated)
    assert [r.reason for r in refusals] == ["max_concurrent_streams"]
    assert srv.refused == 1
    hold.set()
    events = await link.exchange()
    assert sorted(e.stream_id for e in of(events, h2.events.ResponseReceived)) == sids[:2]


async def test_too_many_header_fields_is_431() -> None:
    async def handler(ex: H2ServerExchange) -> None:
        raise AssertionError("must not be called")

    link, _, refusals = server(handler, Limits(max_headers=8))
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(
        sid, request(extra=[(f"x-h{i}", "v") for i in range(10)]), end_stream=True
    )
    events = await link.exchange()
    assert hdrs(of(events, h2.events.ResponseReceived)[0]) == {":status": "431"}
    assert [(r.status, r.reason) for r in refusals] == [(431, "too_many_headers")]


async def test_header_list_over_the_limit_ends_the_connection() -> None:
    async def handler(ex: H2ServerExchange) -> None:
        raise AssertionError("must not be called")

    link, srv, refusals = server(handler, Limits(max_header_bytes=2048))
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request(extra=[("x-big", "a" * 4096)]), end_stream=True)
    events = await link.exchange()
    (gone,) = of(events, h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert [r.reason for r in refusals] == ["header_too_large"]
    assert srv.dead and link.wire.eof


async def test_invalid_content_length_is_a_protocol_error() -> None:
    """h2 checks content-length (1*DIGIT) before we see the request: the connection ends with
    PROTOCOL_ERROR, the handler never runs, and the refusal is reported."""

    async def handler(ex: H2ServerExchange) -> None:
        raise AssertionError("must not be called")

    link, srv, refusals = server(handler)
    link.peer = h2.connection.H2Connection(  # (nothing sent yet: swap in a lax peer)
        h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False
        )
    )
    link.peer.initiate_connection()
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request(method="POST", extra=[("content-length", "+5")]))
    events = await link.exchange()
    (gone,) = of(events, h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert [r.reason for r in refusals] == ["h2_protocol_error"]
    assert srv.opened == 0 and srv.dead


async def test_peer_reset_cancels_the_handler() -> None:
    cancelled = asyncio.Event()

    async def handler(ex: H2ServerExchange) -> None:
        try:
            await ex.body.read()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    link, srv, _ = server(handler)
    await settled(link)
    sid = link.peer.get_next_available_stream_id()
    link.peer.send_headers(sid, request(method="POST"))
    await link.exchange()
    link.peer.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await link.exchange()
    assert cancelled.is_set()
    assert srv.early_resets == 1


async def test_rapid_reset_ends_the_connection() -> None:
    async def handler(ex: H2ServerExchange) -> None:
        await asyncio.sleep(3600)

    link, srv, refusals = server(handler, Limits(rapid_resets=5))
    await settled(link)
    for _ in range(8):
        sid = link.peer.get_next_available_stream_id()
        link.peer.send_headers(sid, request())
        link.peer.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    events = await link.exchange()
    (gone,) = of(events, h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert [r.reason for r in refusals] == ["rapid_reset"]
    assert srv.dead


async def test_ping_flood_ends_the_connection() -> None:
    async def handler(ex: H2ServerExchange) -> None:
        raise AssertionError("must not be called")

    link, _, refusals = server(handler, Limits(max_control_frames=5))
    await settled(link)
    for i in range(10):
        link.peer.ping(i.to_bytes(8, "big"))
    events = await link.exchange()
    (gone,) = of(events, h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert [r.reason for r in refusals] == ["control_frame_flood"]


# -- upstream ------------------------------------------------------------------------------


def client() -> tuple[Link, H2Client, list[H2Client]]:
    gone: list[H2Client] = []
    cl = H2Client(on_gone=gone.append)
    return Link(cl, peer_is_client=False), cl, gone


HEAD = RequestHead(
    "GET", "/api", "backend:8080", [("x-req", "1")], te_trailers=True, end_stream=True
)


async def test_client_request_and_streamed_response() -> None:
    link, cl, _ = client()
    await settled(link)
    ex = cl.open(HEAD)
    events = await link.exchange()
    (req,) = of(events, h2.events.RequestReceived)
    assert hdrs(req) == {
        ":method": "GET", ":scheme": "http", ":authority": "backend:8080", ":path": "/api",
        "x-req": "1", "te": "trailers",
    }  # fmt: skip
    link.peer.send_headers(req.stream_id, [(":status", "200"), ("content-type", "a/b")])
    link.peer.send_data(req.stream_id, b"part1")
    link.peer.send_headers(req.stream_id, [("grpc-status", "0")], end_stream=True)
    await link.exchange()
    head = await ex.response
    assert (head.status, head.headers) == (200, [("content-type", "a/b")])
    assert await ex.body.read() == b"part1"
    assert await ex.body.read() == b""
    assert ex.body.trailers == [("grpc-status", "0")]
    assert cl.streams == {}


async def test_client_stream_reset_by_the_backend_fails_the_exchange() -> None:
    link, cl, _ = client()
    await settled(link)
    ex = cl.open(HEAD)
    events = await link.exchange()
    (req,) = of(events, h2.events.RequestReceived)
    link.peer.reset_stream(req.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    await link.exchange()
    with pytest.raises(StreamReset):
        await ex.response
    with pytest.raises(StreamReset):
        await ex.body.read()


async def test_client_goaway_fails_pending_exchanges_and_reports_gone() -> None:
    link, cl, gone = client()
    await settled(link)
    ex = cl.open(HEAD)
    await link.exchange()
    link.peer.close_connection()
    await link.exchange()
    with pytest.raises(StreamReset):
        await ex.response
    assert gone == [cl]
    assert not cl.has_room


async def test_client_room_follows_the_backends_stream_limit() -> None:
    link, cl, _ = client()
    link.peer.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    await settled(link)
    assert cl.has_room
    cl.open(HEAD)
    assert not cl.has_room
