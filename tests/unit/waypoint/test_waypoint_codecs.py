"""The waypoint's HTTP codecs without sockets: bytes in through an in-memory wire, parsed
messages and bytes out. Back-pressure, pipelining, chunked trailers, HEAD/1xx handling,
stale-connection detection, retry buffering."""

from __future__ import annotations

import asyncio

import pytest

from mesh.config.model import ServicePort
from waypoint.h1 import H1Client, H1Server, H1ServerExchange
from waypoint.service import port_protocol
from waypoint.wire import (
    HIGH_WATER,
    Body,
    ReplayableBody,
    RequestHead,
    ResponseHead,
    StreamReset,
    end_to_end,
)


class Wire:
    """The byte stream under a codec: records what the codec writes and how it flow-controls."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.paused = False
        self.pauses = 0
        self.eof = False
        self.aborted = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_received = self.bytes_sent = 0

    def join(self, peer: object) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def write_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


async def test_body_queue_joins_chunks_and_reports_consumption() -> None:
    consumed: list[int] = []
    b = Body(consumed.append)
    b.feed(b"ab")
    b.feed(b"cd")
    assert b.buffered == 4
    assert await b.read() == b"abcd" and consumed == [4] and b.buffered == 0
    b.end([("grpc-status", "0")])
    assert await b.read() == b"" and b.trailers == [("grpc-status", "0")]


async def test_body_failure_reaches_the_reader() -> None:
    b = Body()
    reader = asyncio.create_task(b.read())
    await asyncio.sleep(0)
    b.fail(StreamReset("gone"))
    with pytest.raises(StreamReset):
        await reader


async def test_replayable_body_replays_until_it_overflows() -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()
            self.trailers: object = "unset"

        async def send_data(self, data: bytes) -> None:
            self.data += data

        async def finish(self, trailers: object = None) -> None:
            self.trailers = trailers

    src = Body()
    src.feed(b"hello ")
    src.feed(b"world")
    src.end()
    rb = ReplayableBody(src, limit=100)
    first, second = Sink(), Sink()
    await rb.pump(first)  # type: ignore[arg-type]
    await rb.pump(second)  # type: ignore[arg-type]
    assert bytes(first.data) == bytes(second.data) == b"hello world"
    big = Body()
    big.feed(b"x" * 150)
    big.end()
    rb2 = ReplayableBody(big, limit=100)
    sink = Sink()
    await rb2.pump(sink)  # type: ignore[arg-type]
    assert len(sink.data) == 150 and not rb2.replayable
    with pytest.raises(StreamReset):
        await rb2.pump(Sink())  # type: ignore[arg-type]


def test_end_to_end_drops_hop_by_hop_and_connection_named_headers() -> None:
    hs = [("connection", "keep-alive, x-private"), ("x-private", "1"), ("te", "trailers"),
          ("transfer-encoding", "chunked"), ("x-keep", "2"), ("host", "h")]  # fmt: skip
    assert end_to_end(hs) == [("x-keep", "2")]


def test_port_protocol_follows_app_protocol_then_name() -> None:
    assert port_protocol(ServicePort(80, 80, app_protocol="grpc")) == "h2"
    assert port_protocol(ServicePort(80, 80, name="grpc-web")) == "h2"
    assert port_protocol(ServicePort(80, 80, name="http2")) == "h2"
    assert port_protocol(ServicePort(80, 80, name="http-api")) == "http/1.1"
    assert port_protocol(ServicePort(80, 80, name="grpc", app_protocol="http")) == "http/1.1"
    assert port_protocol(ServicePort(80, 80, name="tcp")) == ""
    assert port_protocol(None) == ""


# -- HTTP/1.1 server --------------------------------------------------------------------------


def server(handler: object) -> tuple[H1Server, Wire]:
    s = H1Server(handler)  # type: ignore[arg-type]
    w = Wire()
    s.join(w)  # type: ignore[arg-type]
    return s, w


async def test_pipelined_requests_are_answered_in_order_with_streamed_bodies() -> None:
    seen: list[tuple[str, bytes, object]] = []

    async def handler(ex: H1ServerExchange) -> None:
        body = bytearray()
        while chunk := await ex.body.read():
            body += chunk
        seen.append((ex.head.target, bytes(body), ex.body.trailers))
        await ex.send_head(ResponseHead(200, [("x-n", str(len(seen)))]))
        await ex.send_data(b"ok")
        await ex.finish()

    s, w = server(handler)
    run = asyncio.create_task(s.run())
    s.write(
        b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-trailer: t\r\n\r\n"
        b"GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    await asyncio.wait_for(run, 5)
    assert seen == [("/a", b"", None), ("/b", b"abc", [("x-trailer", "t")]), ("/c", b"", None)]
    out = bytes(w.out)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    # unknown length: chunked, ending with the last chunk
    assert out.index(b"x-n: 1") < out.index(b"x-n: 2") < out.index(b"x-n: 3")
    assert b"transfer-encoding: chunked\r\n" in out and b"2\r\nok\r\n0\r\n\r\n" in out
    assert out.rstrip().endswith(b"0")  # last response, then the close
    assert w.eof


async def test_request_body_pauses_the_wire_until_the_handler_reads() -> None:
    gate = asyncio.Event()
    total = 0

    async def handler(ex: H1ServerExchange) -> None:
        nonlocal total
        await gate.wait()
        while chunk := await ex.body.read():
            total += len(chunk)
        await ex.send_head(ResponseHead(204, []))
        await ex.finish()

    s, w = server(handler)
    run = asyncio.create_task(s.run())
    s.write(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (4 * HIGH_WATER))
    chunk = b"z" * 65536
    for _ in range(4 * HIGH_WATER // len(chunk)):
        if w.paused:
            break
        s.write(chunk)
    assert w.paused  # the handler has not read: the wire is told to stop
    assert s._queue[0].body.buffered <= HIGH_WATER + len(chunk)
    gate.set()
    for _ in range(100):
        await asyncio.sleep(0)
        if not w.paused:
            break
    assert not w.paused  # drained below the low-water mark: reading resumes
    sent = s._queue[0].body.received
    while sent < 4 * HIGH_WATER:
        s.write(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)
    s.write_eof()
    await asyncio.wait_for(run, 5)
    assert total == 4 * HIGH_WATER


async def test_malformed_request_gets_400_and_the_connection_closes() -> None:
    async def handler(ex: H1ServerExchange) -> None:
        raise AssertionError("never called")

    s, w = server(handler)
    run = asyncio.create_task(s.run())
    s.write(b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n")
    await asyncio.wait_for(run, 5)
    assert w.out.startswith(b"HTTP/1.1 400 Bad Request") and w.eof


async def test_expect_100_continue_is_answered_at_once() -> None:
    async def handler(ex: H1ServerExchange) -> None:
        assert await ex.body.read() == b"data"
        assert "expect" not in dict(ex.head.headers)
        await ex.send_head(ResponseHead(200, [("content-length", "0")]))
        await ex.finish()

    s, w = server(handler)
    run = asyncio.create_task(s.run())
    s.write(b"PUT /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
    assert w.out == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.write(b"data")
    s.write_eof()
    await asyncio.wait_for(run, 5)
    assert b"HTTP/1.1 200 OK" in w.out


async def test_unread_request_body_means_no_keep_alive() -> None:
    async def handler(ex: H1ServerExchange) -> None:
        await ex.send_head(ResponseHead(403, [("content-length", "0")]))  # denied, body unread
        await ex.finish()

    s, w = server(handler)
    run = asyncio.create_task(s.run())
    s.write(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12345")
    await asyncio.wait_for(run, 5)
    assert b"connection: close" in w.out and w.eof


# -- HTTP/1.1 client --------------------------------------------------------------------------


def client() -> tuple[H1Client, Wire, list[str]]:
    events: list[str] = []
    c = H1Client(on_free=lambda _c: events.append("free"), on_gone=lambda _c: events.append("gone"))
    w = Wire()
    c.join(w)  # type: ignore[arg-type]
    return c, w, events


async def test_client_frames_request_and_streams_response_with_trailers() -> None:
    c, w, events = client()
    ex = c.start(RequestHead("POST", "/p", "svc:80", [("content-length", "9"), ("x-a", "1")]))
    await ex.send_data(b"abc")
    await ex.finish(None)
    assert w.out.startswith(b"POST /p HTTP/1.1\r\nx-a: 1\r\nhost: svc:80\r\n")
    assert b"transfer-encoding: chunked" in w.out and w.out.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    c.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    c.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-b: 2\r\n\r\n4\r\ndata\r\n")
    head = await ex.response
    assert head.status == 200 and ("x-b", "2") in head.headers
    assert ("transfer-encoding", "chunked") not in head.headers
    assert await ex.body.read() == b"data"
    c.write(b"0\r\ngrpc-status: 0\r\n\r\n")
    assert await ex.body.read() == b"" and ex.body.trailers == [("grpc-status", "0")]
    ex.release()
    assert events == ["free"] and c.reusable


async def test_client_head_response_has_no_body_and_is_not_reused() -> None:
    c, _w, events = client()
    ex = c.start(RequestHead("HEAD", "/", "svc", [], end_stream=True))
    await ex.finish(None)
    c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    head = await ex.response
    assert head.end_stream and ("content-length", "1000") in head.headers
    assert await ex.body.read() == b""
    ex.release()
    assert not c.reusable and "free" not in events


async def test_idle_connection_closed_by_backend_leaves_the_pool() -> None:
    c, _w, events = client()
    ex = c.start(RequestHead("GET", "/", "svc", [], end_stream=True))
    await ex.finish(None)
    c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await ex.response
    assert await ex.body.read() == b"ok"
    ex.release()
    assert events == ["free"]
    c.write_eof()  # the backend's idle timeout fired
    assert events == ["free", "gone"] and not c.reusable


async def test_connection_dying_before_the_response_fails_the_exchange() -> None:
    c, _w, events = client()
    ex = c.start(RequestHead("GET", "/", "svc", [], end_stream=True))
    await ex.finish(None)
    c.write_eof()
    with pytest.raises(StreamReset):
        await ex.response
    assert events == ["gone"]


async def test_close_delimited_response_ends_at_eof() -> None:
    c, _w, _ = client()
    ex = c.start(RequestHead("GET", "/", "svc", [], end_stream=True))
    await ex.finish(None)
    c.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of ")
    await ex.response
    c.write(b"it")
    c.write_eof()
    data = b""
    while chunk := await ex.body.read():
        data += chunk
    assert data == b"all of it"
