"""The HBONE protocol core (mesh.hbone.core) played with bytes against a real h2 peer: every
rule the node proxy enforces on a CONNECT stream, without a socket, TLS or an event loop.

Each test is a short exchange: the peer (h2's own H2Connection) writes frames, the core turns
them into events and answers with bytes, which the peer parses back into h2 events."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from mesh.hbone.core import (
    SEND_HIGH_WATER,
    SEND_LOW_WATER,
    STREAM_UPDATE_AT,
    STREAM_WINDOW,
    ConnectionFailed,
    ConnectionTerminated,
    ConnectRejected,
    ConnectRequested,
    DataReceived,
    Event,
    HboneCore,
    ResponseReceived,
    StreamClosed,
    StreamEnded,
    StreamRefused,
    StreamReset,
    StreamState,
    WriteBlocked,
    WriteUnblocked,
)
from mesh.hbone.frames import CLIENT_PREFACE, data_header
from mesh.hbone.limits import HboneLimits

PEER_ID = "spiffe://cluster.local/ns/default/sa/client"


class Playbook:
    """A server-side core and a client-side h2 peer, wired by hand."""

    def __init__(self, *, limits: HboneLimits | None = None, serving: bool = True) -> None:
        self.core = HboneCore(client_side=False, limits=limits or HboneLimits(), serving=serving)
        self.core.initiate(PEER_ID)
        self.peer = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.peer.initiate_connection()

    def to_core(self, raw: bytes | None = None, *, consume: bool = True) -> list[Event]:
        """What the peer wrote (or `raw`), fed to the core; DATA delivered at once."""
        events = self.core.receive_data(self.peer.data_to_send() if raw is None else raw)
        if consume:
            for e in events:
                if isinstance(e, DataReceived) and e.flow_controlled:
                    self.core.consumed(e.stream_id, e.flow_controlled)
        return events

    def wire(self) -> bytes:
        return b"".join(bytes(b) for b in self.core.data_to_send())

    def to_peer(self) -> list[Any]:
        """What the core wrote, parsed by the peer."""
        out = self.wire()
        return self.peer.receive_data(out) if out else []

    def settle(self) -> None:
        """Both SETTINGS frames sent and acknowledged."""
        assert self.to_core() == []
        self.to_peer()
        assert self.to_core() == []
        self.to_peer()

    def connect(self, authority: str = "10.0.0.7:8080", **kw: Any) -> int:
        sid = self.peer.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", authority), *kw.get("extra", [])]
        self.peer.send_headers(sid, headers)
        return sid

    def accepted(self, authority: str = "10.0.0.7:8080") -> StreamState:
        sid = self.connect(authority)
        events = self.to_core()
        assert events == [
            ConnectRequested(sid, authority, {":method": "CONNECT", ":authority": authority})
        ]
        st = self.core.stream(sid)
        assert st is not None
        self.core.accept(st)
        (resp,) = self.to_peer()
        assert isinstance(resp, h2.events.ResponseReceived)
        assert hdrs(resp)[":status"] == "200"
        return st


def hdrs(ev: Any) -> dict[str, str]:
    """A HEADERS event's fields (the peer decodes them as text)."""
    return {str(k): str(v) for k, v in ev.headers}


def of(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_connect_is_offered_accepted_and_carries_bytes_both_ways() -> None:
    p = Playbook()
    p.settle()
    sid = p.connect(extra=[("x-ambientmesh-source-principal", "spiffe://x/ns/a/sa/b")])
    (req,) = p.to_core()
    assert isinstance(req, ConnectRequested)
    assert (req.stream_id, req.authority) == (sid, "10.0.0.7:8080")
    assert req.headers["x-ambientmesh-source-principal"] == "spiffe://x/ns/a/sa/b"
    assert p.core.peer_identity == PEER_ID
    st = p.core.stream(sid)
    assert st is not None
    p.core.accept(st)
    (resp,) = p.to_peer()
    assert isinstance(resp, h2.events.ResponseReceived)
    assert hdrs(resp) == {":status": "200"}

    p.peer.send_data(sid, b"hello upstream")
    events = p.to_core()
    assert [bytes(e.data) for e in of(events, DataReceived)] == [b"hello upstream"]
    assert st.received == len(b"hello upstream")

    p.core.send(st, b"hello downstream")
    (data,) = p.to_peer()
    assert isinstance(data, h2.events.DataReceived) and data.data == b"hello downstream"
    assert st.sent == len(b"hello downstream")

    p.peer.end_stream(sid)  # h2 ends with an empty DATA frame carrying END_STREAM
    assert of(p.to_core(), StreamEnded) == [StreamEnded(sid)]
    p.core.end_stream(st)
    assert p.core.take_events() == [StreamClosed(sid)]
    assert of(p.to_peer(), h2.events.StreamEnded)
    assert p.core.streams == {}


def test_connect_accepted_before_the_settings_exchange() -> None:
    """The first flight (preface, SETTINGS, HEADERS, DATA in one write) is a whole tunnel."""
    p = Playbook()
    sid = p.connect()
    p.peer.send_data(sid, b"early")
    events = p.to_core()
    assert isinstance(events[0], ConnectRequested)
    assert [bytes(e.data) for e in of(events, DataReceived)] == [b"early"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a")], 405),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a")], 405),
        ([(":method", "CONNECT"), (":authority", "")], 400),
    ],
)
def test_requests_that_are_not_a_connect_are_answered_by_the_core(
    headers: list[tuple[str, str]], status: int
) -> None:
    p = Playbook()
    p.peer = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False
        )
    )
    p.peer.initiate_connection()
    p.settle()
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, headers, end_stream=False)
    assert p.to_core() == [ConnectRejected(sid, status), StreamClosed(sid)]
    resp, ended = p.to_peer()
    assert dict(resp.headers)[":status"] == str(status)
    assert isinstance(ended, h2.events.StreamEnded)
    assert p.core.streams == {}


def test_connect_with_nobody_serving_is_400() -> None:
    p = Playbook(serving=False)
    p.settle()
    sid = p.connect()
    assert p.to_core() == [ConnectRejected(sid, 400), StreamClosed(sid)]


def test_rejected_connect_carries_status_and_reason() -> None:
    p = Playbook()
    p.settle()
    sid = p.connect()
    p.to_core()
    st = p.core.stream(sid)
    assert st is not None
    p.core.reject(st, 403, "denied by policy")
    assert p.core.take_events() == [StreamClosed(sid)]
    resp, ended = p.to_peer()
    assert dict(resp.headers) == {":status": "403", "x-hbone-error": "denied by policy"}
    assert isinstance(ended, h2.events.StreamEnded)
    # The connection is fine: the next CONNECT is offered as usual.
    sid2 = p.connect()
    assert isinstance(p.to_core()[0], ConnectRequested)
    assert sid2 > sid


def test_peer_reset_is_reported_so_the_upstream_goes_down() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.peer.reset_stream(st.stream_id, h2.errors.ErrorCodes.CANCEL)
    assert p.to_core() == [
        StreamReset(st.stream_id, h2.errors.ErrorCodes.CANCEL),
        StreamClosed(st.stream_id),
    ]
    assert st.reset and st.closed
    # Writes to a reset stream go nowhere; they do not raise.
    p.core.send(st, b"late")
    p.core.end_stream(st)
    assert p.wire() == b""


def test_reset_before_the_answer_is_reported() -> None:
    p = Playbook()
    p.settle()
    sid = p.connect()
    p.peer.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    events = p.to_core()
    assert events == [
        ConnectRequested(
            sid, "10.0.0.7:8080", {":method": "CONNECT", ":authority": "10.0.0.7:8080"}
        ),
        StreamReset(sid, h2.errors.ErrorCodes.CANCEL),
        StreamClosed(sid),
    ]
    assert p.core.stream(sid) is None


def test_our_reset_sends_rst_stream_cancel() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.core.reset_stream(st)
    assert p.core.take_events() == [StreamClosed(st.stream_id)]
    (rst,) = p.to_peer()
    assert isinstance(rst, h2.events.StreamReset)
    assert rst.error_code == h2.errors.ErrorCodes.CANCEL


def test_stream_past_the_limit_is_refused_alone_before_settings_ack() -> None:
    """A peer that has not seen our SETTINGS yet may open more than we allow: the extra
    stream is refused (retry-safe), the others and the connection carry on."""
    p = Playbook(limits=HboneLimits(max_streams=2))
    sids = [p.connect() for _ in range(3)]
    events = p.to_core()
    assert of(events, ConnectRequested) == [
        ConnectRequested(s, "10.0.0.7:8080", {":method": "CONNECT", ":authority": "10.0.0.7:8080"})
        for s in sids[:2]
    ]
    assert of(events, StreamRefused) == [StreamRefused(sids[2])]
    assert p.core.streams_refused == 1
    peer_events = p.to_peer()
    resets = of(peer_events, h2.events.StreamReset)
    assert [(r.stream_id, r.error_code) for r in resets] == [
        (sids[2], h2.errors.ErrorCodes.REFUSED_STREAM)
    ]
    assert not of(peer_events, h2.events.ConnectionTerminated)
    # The accepted streams still work.
    st = p.core.stream(sids[0])
    assert st is not None
    p.core.accept(st)
    assert isinstance(p.to_peer()[0], h2.events.ResponseReceived)


def test_stream_past_the_limit_is_refused_after_settings_ack_and_room_frees_up() -> None:
    p = Playbook(limits=HboneLimits(max_streams=2))
    p.settle()
    assert p.peer.remote_settings.max_concurrent_streams == 2  # advertised...
    # ...and enforced on a peer that ignores it.
    p.peer.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
    p.peer.remote_settings.acknowledge()
    first, _second = p.accepted(), p.accepted()
    extra = p.connect()
    assert p.to_core() == [StreamRefused(extra)]
    (rst,) = p.to_peer()
    assert (rst.stream_id, rst.error_code) == (extra, h2.errors.ErrorCodes.REFUSED_STREAM)
    p.peer.reset_stream(first.stream_id)
    p.to_core()
    again = p.connect()
    assert isinstance(p.to_core()[0], ConnectRequested)
    assert p.core.stream(again) is not None


def test_header_list_over_the_limit_ends_the_connection_with_goaway() -> None:
    p = Playbook(limits=HboneLimits(max_header_list_size=1024))
    p.settle()
    assert p.peer.remote_settings.max_header_list_size == 1024
    p.connect(extra=[("x-big", "a" * 4096)])
    events = p.to_core()
    assert len(events) == 1 and isinstance(events[0], ConnectionFailed)
    (gone,) = of(p.to_peer(), h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert p.core.streams == {}


def test_no_data_beyond_the_peers_window_and_blocking_signals() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    window = p.peer.local_settings.initial_window_size  # 65535: the peer never raised it
    payload = bytes(window + SEND_HIGH_WATER + 1)
    p.core.send(st, payload)
    assert p.core.take_events() == [WriteBlocked(st.stream_id)]
    got = of(p.to_peer(), h2.events.DataReceived)
    assert sum(len(e.data) for e in got) == window
    assert st.sent == window
    assert p.wire() == b""  # nothing more until the peer gives credit

    # Credit in small steps releases exactly that much.
    p.peer.acknowledge_received_data(window, st.stream_id)
    p.to_core()
    got = of(p.to_peer(), h2.events.DataReceived)
    assert sum(len(e.data) for e in got) <= window

    # A generous peer drains the queue: below the low-water mark the writer may resume.
    p.peer.increment_flow_control_window(2**30)
    p.peer.increment_flow_control_window(2**30, stream_id=st.stream_id)
    events = p.to_core()
    assert events == [WriteUnblocked(st.stream_id)]
    assert st.pending_bytes <= SEND_LOW_WATER
    total = sum(len(e.data) for e in of(p.to_peer(), h2.events.DataReceived))
    assert st.sent == len(payload) and total > 0


def test_end_stream_waits_for_queued_data() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.core.send(st, bytes(100_000))
    p.core.end_stream(st)
    events = p.to_peer()
    assert not of(events, h2.events.StreamEnded)
    p.peer.increment_flow_control_window(1 << 20)
    p.peer.increment_flow_control_window(1 << 20, stream_id=st.stream_id)
    p.to_core()
    events = p.to_peer()
    assert of(events, h2.events.StreamEnded)
    assert st.sent == 100_000


def window_updates(events: list[Any]) -> list[tuple[int, int]]:
    return [(e.stream_id, e.delta) for e in of(events, h2.events.WindowUpdated)]


def test_credit_is_returned_in_batches_not_per_frame() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.peer.send_data(st.stream_id, bytes(1024))
    p.to_core()
    assert window_updates(p.to_peer()) == []  # a small request costs no WINDOW_UPDATE
    sent = 1024
    chunk = p.peer.max_outbound_frame_size
    while sent < STREAM_UPDATE_AT:
        n = min(chunk, STREAM_UPDATE_AT - sent)
        p.peer.send_data(st.stream_id, bytes(n))
        sent += n
    p.to_core()
    assert window_updates(p.to_peer()) == [(st.stream_id, STREAM_UPDATE_AT)]


def test_paused_stream_returns_no_credit_until_resumed() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.core.pause(st)
    chunk = p.peer.max_outbound_frame_size
    sent = 0
    while sent < STREAM_UPDATE_AT:
        p.peer.send_data(st.stream_id, bytes(chunk))
        sent += chunk
    assert sum(len(e.data) for e in of(p.to_core(), DataReceived)) == sent
    assert window_updates(p.to_peer()) == []
    assert st.unacked == sent
    p.core.resume(st)
    assert window_updates(p.to_peer()) == [(st.stream_id, sent)]
    assert st.unacked == 0


def test_paused_stream_flooded_past_its_window_is_a_flow_control_error() -> None:
    p = Playbook()
    p.settle()
    st = p.accepted()
    p.core.pause(st)
    frame = 256 * 1024
    flood = b"".join(
        data_header(st.stream_id, frame) + bytes(frame) for _ in range(STREAM_WINDOW // frame + 1)
    )
    events = p.to_core(flood)
    assert isinstance(events[-1], ConnectionFailed)
    (gone,) = of(p.to_peer(), h2.events.ConnectionTerminated)
    assert gone.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


def test_peer_goaway_is_reported() -> None:
    p = Playbook()
    p.settle()
    p.peer.close_connection()
    assert p.to_core() == [ConnectionTerminated(0)]


def test_garbage_instead_of_a_preface_fails_the_connection() -> None:
    core = HboneCore(client_side=False, limits=HboneLimits(), serving=True)
    core.initiate(PEER_ID)
    events = core.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(len(CLIENT_PREFACE)))
    assert len(events) == 1 and isinstance(events[0], ConnectionFailed)


def test_connection_loss_resets_every_stream() -> None:
    p = Playbook()
    p.settle()
    a, b = p.accepted(), p.accepted()
    assert p.core.connection_lost() == [
        StreamReset(a.stream_id, None),
        StreamClosed(a.stream_id),
        StreamReset(b.stream_id, None),
        StreamClosed(b.stream_id),
    ]
    assert p.core.streams == {}


class ClientPlaybook:
    """A client-side core and a server-side h2 peer."""

    def __init__(self) -> None:
        self.core = HboneCore(client_side=True, limits=HboneLimits(), serving=False)
        self.core.initiate("spiffe://cluster.local/ns/default/sa/server")
        self.peer = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.peer.initiate_connection()
        self.peer.receive_data(b"".join(bytes(b) for b in self.core.data_to_send()))
        assert self.core.receive_data(self.peer.data_to_send()) == []
        self.peer.receive_data(b"".join(bytes(b) for b in self.core.data_to_send()))

    def to_peer(self) -> list[Any]:
        return self.peer.receive_data(b"".join(bytes(b) for b in self.core.data_to_send()))


def test_client_connect_200_opens_the_lean_path() -> None:
    c = ClientPlaybook()
    st = c.core.open_stream("10.0.0.9:80", [("x-ambientmesh-source-principal", "spiffe://a")])
    (req,) = c.to_peer()
    assert isinstance(req, h2.events.RequestReceived)
    headers: dict[Any, Any] = dict(req.headers)
    assert headers[":authority"] == "10.0.0.9:80"
    assert not st.fast_in
    c.peer.send_headers(st.stream_id, [(":status", "200")])
    c.peer.send_data(st.stream_id, b"pong")
    events = c.core.receive_data(c.peer.data_to_send())
    assert events[0] == ResponseReceived(st.stream_id, 200, [(":status", "200")])
    assert [bytes(e.data) for e in of(events, DataReceived)] == [b"pong"]
    assert st.fast_in


def test_client_refused_stream_carries_the_code() -> None:
    c = ClientPlaybook()
    st = c.core.open_stream("10.0.0.9:80", [])
    c.to_peer()
    c.peer.reset_stream(st.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    events = c.core.receive_data(c.peer.data_to_send())
    assert events == [
        StreamReset(st.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM),
        StreamClosed(st.stream_id),
    ]
    assert st.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM


def test_client_error_answer_is_not_a_tunnel() -> None:
    c = ClientPlaybook()
    st = c.core.open_stream("10.0.0.9:80", [])
    c.to_peer()
    c.peer.send_headers(
        st.stream_id, [(":status", "503"), ("x-hbone-error", "no route")], end_stream=True
    )
    events = c.core.receive_data(c.peer.data_to_send())
    assert events[0] == ResponseReceived(
        st.stream_id, 503, [(":status", "503"), ("x-hbone-error", "no route")]
    )
    assert not st.fast_in
    c.core.discard(st)
    assert c.core.streams == {}


def test_pause_during_delivery_holds_back_the_rest_of_the_same_read() -> None:
    """Credit follows delivery, not parsing: a reader that pauses on the first chunk of a read
    gets no credit returned for the chunks after it."""
    p = Playbook()
    p.settle()
    st = p.accepted()
    chunk = p.peer.max_outbound_frame_size
    n = STREAM_UPDATE_AT // chunk + 1
    for _ in range(n):
        p.peer.send_data(st.stream_id, bytes(chunk))
    events = of(p.to_core(consume=False), DataReceived)
    assert len(events) == n
    first, *rest = events
    p.core.consumed(first.stream_id, first.flow_controlled)
    p.core.pause(st)  # the first chunk filled the reader's buffer
    for e in rest:
        p.core.consumed(e.stream_id, e.flow_controlled)
    assert window_updates(p.to_peer()) == []
    assert st.unacked == (n - 1) * chunk
    p.core.resume(st)
    assert window_updates(p.to_peer()) == [(st.stream_id, n * chunk)]


def test_closed_streams_are_remembered_within_a_bound() -> None:
    """A long-lived pooled connection carries stream after stream; h2 would remember 65,536
    closed ones (about 9 MB). Both ends of the tunnel keep at most 1,024."""
    p = Playbook()
    p.settle()
    for _ in range(1500):
        sid = p.connect()
        (req,) = of(p.to_core(), ConnectRequested)
        st = p.core.stream(req.stream_id)
        assert st is not None
        p.core.reset_stream(st)
        p.to_peer()
        assert sid == req.stream_id
    assert 0 < len(p.core.h2._closed_streams) <= 1024


def test_has_output_follows_h2s_buffer() -> None:
    """HboneCore skips h2's data_to_send when `has_output` says there is nothing, which reads
    h2's private buffer: a different h2 would lose frames here first."""
    core = HboneCore(client_side=True, limits=HboneLimits(), serving=False)
    assert not core.h2.has_output()
    core.initiate("spiffe://cluster.local/ns/a/sa/b")
    assert core.h2.has_output()  # the preface and SETTINGS
    assert core.data_to_send()
    assert not core.h2.has_output()
    assert core.data_to_send() == []
