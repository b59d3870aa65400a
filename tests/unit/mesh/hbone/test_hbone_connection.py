"""The HBONE asyncio glue (mesh.hbone.connection) over an in-memory transport: a real event
loop and a real h2 peer, no socket and no TLS (the peer check is passed in). What is asserted
is what the glue adds to the core: handler tasks, futures, the joined endpoint's fate, the
refusal hook and the client's errors."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from mesh.hbone.connection import ConnectRequest, HboneConnection, HboneError, HboneStream
from mesh.hbone.limits import HboneLimits
from mesh.stream import Endpoint, EndpointState

PEER = "spiffe://cluster.local/ns/default/sa/client"
ADDR = ("10.0.0.1", 40000)


class MemoryTransport(asyncio.Transport):
    """Keeps what the protocol writes; closing is recorded, nothing else happens."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self._extra = {"peername": ADDR, **(extra or {})}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def writelines(self, list_of_data: Any) -> None:
        for d in list_of_data:
            self.out += d

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


class Recorder(EndpointState):
    """What a tunnel is joined to (the upstream TCP socket, in ztunnel)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.eof = False
        self.aborted = False

    def join(self, peer: Endpoint) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

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


class Side:
    """An HboneConnection on a memory transport and the h2 peer facing it."""

    def __init__(self, conn: HboneConnection, *, peer_is_client: bool) -> None:
        self.conn = conn
        self.transport = MemoryTransport()
        self.peer = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=peer_is_client, header_encoding="utf-8")
        )
        self.peer.initiate_connection()
        conn.connection_made(self.transport)

    def to_conn(self) -> None:
        data = self.peer.data_to_send()
        if data:
            self.conn.data_received(data)

    def to_peer(self) -> list[Any]:
        out = bytes(self.transport.out)
        self.transport.out.clear()
        return self.peer.receive_data(out) if out else []

    async def exchange(self) -> list[Any]:
        self.to_conn()
        await turns()
        return self.to_peer()


def of(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def hdrs(ev: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in ev.headers}


async def serving(handler: Any, **kw: Any) -> Side:
    conn = HboneConnection(
        client_side=False, trust_domain="cluster.local", handler=handler,
        check_peer=lambda t: PEER, **kw,
    )  # fmt: skip
    side = Side(conn, peer_is_client=True)
    await side.exchange()
    await side.exchange()
    return side


def connect(side: Side, authority: str = "10.0.0.7:8080") -> int:
    sid = side.peer.get_next_available_stream_id()
    side.peer.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
    return sid


async def test_without_tls_the_connection_is_refused() -> None:
    """The default peer check: no TLS, no HBONE."""
    conn = HboneConnection(client_side=False, trust_domain="cluster.local")
    t = MemoryTransport()
    conn.connection_made(t)
    with pytest.raises(HboneError, match="requires TLS"):
        await conn.ready
    assert t.aborted and t.out == b""


async def test_accepted_tunnel_carries_bytes_and_a_peer_reset_aborts_the_upstream() -> None:
    requests: list[ConnectRequest] = []
    upstream = Recorder()

    async def handler(req: ConnectRequest) -> None:
        requests.append(req)
        stream = req.accept()
        stream.join(upstream)
        upstream.join(stream)

    side = await serving(handler)
    assert side.conn.peer_identity == PEER
    sid = connect(side)
    side.peer.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
    events = await side.exchange()
    (req,) = requests
    assert (req.authority, req.peer_identity, req.peer_address) == ("10.0.0.7:8080", PEER, ADDR)
    assert hdrs(of(events, h2.events.ResponseReceived)[0]) == {":status": "200"}
    assert bytes(upstream.data) == b"GET / HTTP/1.1\r\n\r\n"  # early bytes, delivered at join
    stream = req.stream
    stream.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await turns()
    (data,) = of(side.to_peer(), h2.events.DataReceived)
    assert data.data == b"HTTP/1.1 200 OK\r\n\r\n"
    assert (stream.bytes_received, stream.bytes_sent) == (18, 19)

    side.peer.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await side.exchange()
    assert upstream.aborted
    assert stream.done.done()
    assert side.conn.active_streams == 0


async def test_reset_before_accept_cancels_the_handler_and_its_dial() -> None:
    cancelled = asyncio.Event()

    async def handler(req: ConnectRequest) -> None:
        try:
            await asyncio.sleep(3600)  # dialing the destination
        except asyncio.CancelledError:
            cancelled.set()
            raise

    side = await serving(handler)
    sid = connect(side)
    await side.exchange()
    side.peer.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    events = await side.exchange()
    assert cancelled.is_set()
    assert not of(events, h2.events.ResponseReceived)


async def test_upstream_joined_after_a_reset_is_aborted() -> None:
    """The dial finished after the client gave up: nothing else would close that socket."""
    upstream = Recorder()
    go = asyncio.Event()

    async def handler(req: ConnectRequest) -> None:
        stream = req.accept()
        await go.wait()  # dialing the destination
        stream.join(upstream)

    side = await serving(handler)
    sid = connect(side)
    await side.exchange()
    side.peer.reset_stream(sid)
    await side.exchange()
    assert not upstream.aborted
    go.set()
    await turns()
    assert upstream.aborted


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("raise", "internal error"), ("silent", "handler did not answer")]
)
async def test_a_handler_that_fails_or_forgets_is_answered_500(behaviour: str, reason: str) -> None:
    async def handler(req: ConnectRequest) -> None:
        if behaviour == "raise":
            raise RuntimeError("bug")

    side = await serving(handler)
    connect(side)
    events = await side.exchange()
    assert hdrs(of(events, h2.events.ResponseReceived)[0]) == {
        ":status": "500",
        "x-hbone-error": reason,
    }
    # ...and the connection carries on.
    connect(side)
    assert of(await side.exchange(), h2.events.ResponseReceived)


async def test_rejection_reaches_the_peer_with_its_reason() -> None:
    async def handler(req: ConnectRequest) -> None:
        req.reject(403, "RBAC: denied")

    side = await serving(handler)
    connect(side)
    events = await side.exchange()
    assert hdrs(of(events, h2.events.ResponseReceived)[0]) == {
        ":status": "403",
        "x-hbone-error": "RBAC: denied",
    }
    assert of(events, h2.events.StreamEnded)
    assert side.conn.active_streams == 0


async def test_stream_over_the_limit_is_reported_to_the_refusal_hook() -> None:
    refused: list[tuple[str, Any]] = []

    async def handler(req: ConnectRequest) -> None:
        req.accept()

    side = await serving(
        handler,
        limits=HboneLimits(max_streams=1),
        on_refused=lambda why, peer: refused.append((why, peer)),
    )
    side.peer.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
    side.peer.remote_settings.acknowledge()
    connect(side)
    extra = connect(side)
    events = await side.exchange()
    assert [(e.stream_id, e.error_code) for e in of(events, h2.events.StreamReset)] == [
        (extra, h2.errors.ErrorCodes.REFUSED_STREAM)
    ]
    assert refused == [("streams", ADDR)]
    assert side.conn.streams_refused == 1


async def test_idle_server_connection_is_closed() -> None:
    async def handler(req: ConnectRequest) -> None:
        req.reject(404)

    side = await serving(handler, limits=HboneLimits(idle_timeout=0.05))
    connect(side)
    await side.exchange()
    for _ in range(200):  # generous: the machine is shared
        if side.transport.closing:
            break
        await asyncio.sleep(0.02)
    assert side.transport.closing
    (gone,) = of(side.to_peer(), h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.NO_ERROR


async def test_protocol_error_closes_with_goaway() -> None:
    side = await serving(None)
    side.conn.data_received(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # increment 0
    assert side.transport.closing
    (gone,) = of(side.to_peer(), h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


# -- client side -----------------------------------------------------------------------------


async def client() -> Side:
    conn = HboneConnection(
        client_side=True, trust_domain="cluster.local", check_peer=lambda t: PEER
    )
    side = Side(conn, peer_is_client=False)
    await conn.ready
    side.to_peer()
    side.to_conn()
    side.to_peer()
    return side


async def open_and_answer(
    side: Side, answer: Any, **kw: Any
) -> tuple[asyncio.Task[HboneStream], list[Any]]:
    task = asyncio.get_running_loop().create_task(side.conn.open_stream("10.0.0.9:80", **kw))
    await turns()
    events = side.to_peer()
    (req,) = of(events, h2.events.RequestReceived)
    answer(req.stream_id)
    side.to_conn()
    await turns()
    return task, events


async def test_client_tunnel_opens_on_200() -> None:
    side = await client()
    task, events = await open_and_answer(
        side, lambda sid: side.peer.send_headers(sid, [(":status", "200")])
    )
    assert hdrs(of(events, h2.events.RequestReceived)[0]) == {
        ":method": "CONNECT",
        ":authority": "10.0.0.9:80",
    }
    stream = await task
    assert side.conn.streams_opened == 1 and side.conn.active_streams == 1
    assert isinstance(stream, HboneStream)


async def test_client_error_answer_raises_with_status_and_reason() -> None:
    side = await client()
    task, _ = await open_and_answer(
        side,
        lambda sid: side.peer.send_headers(
            sid, [(":status", "503"), ("x-hbone-error", "no healthy upstream")], end_stream=True
        ),
    )
    with pytest.raises(HboneError, match="503 no healthy upstream") as err:
        await task
    assert err.value.status == 503 and not err.value.refused
    assert side.conn.active_streams == 0


async def test_client_refused_stream_is_retryable() -> None:
    side = await client()
    task, _ = await open_and_answer(
        side, lambda sid: side.peer.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    )
    with pytest.raises(HboneError) as err:
        await task
    assert err.value.refused and err.value.status == 0


async def test_client_without_an_answer_resets_and_raises_504() -> None:
    side = await client()
    task, _ = await open_and_answer(side, lambda sid: None, response_timeout=0.05)
    with pytest.raises(HboneError) as err:
        await task
    assert err.value.status == 504
    await turns()
    (rst,) = of(side.to_peer(), h2.events.StreamReset)
    assert rst.error_code == h2.errors.ErrorCodes.CANCEL
