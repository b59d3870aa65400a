"""The lean DATA path (mesh.hbone.frames) against a real h2 peer: what we encode h2 accepts,
and what h2 encodes we split correctly, whatever the read boundaries."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import pytest

from mesh.hbone.frames import (
    CLIENT_PREFACE,
    FRAME_SIZE_ERROR,
    FrameError,
    FrameReader,
    data_header,
    window_update,
)


def pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """A client and a server h2 connection that have exchanged prefaces and SETTINGS."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    return c, s


def connect(c: h2.connection.H2Connection, s: h2.connection.H2Connection) -> int:
    sid: int = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    s.receive_data(c.data_to_send())
    return sid


def test_our_data_and_window_update_frames_are_what_h2_reads() -> None:
    c, s = pair()
    sid = connect(c, s)
    payload = bytes(range(256)) * 40
    wire = data_header(sid, len(payload)) + payload + data_header(sid, 0, end_stream=True)
    events = s.receive_data(wire)
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == payload
    assert data[0].flow_controlled_length == len(payload)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)

    before = s.local_flow_control_window(sid)
    events = s.receive_data(window_update(0, 1000) + window_update(sid, 500))
    updates = {e.stream_id: e.delta for e in events if isinstance(e, h2.events.WindowUpdated)}
    assert updates == {0: 1000, sid: 500}
    assert s.local_flow_control_window(sid) == before + 500


class Sink:
    """Records what the reader hands on; h2 (a real server) takes the slow frames."""

    def __init__(self, h2s: h2.connection.H2Connection, fast: set[int]) -> None:
        self.h2 = h2s
        self.fast = fast
        self.data: dict[int, bytearray] = {}
        self.windows: list[tuple[int, int]] = []
        self.events: list[object] = []

    def fast_stream(self, stream_id: int) -> int | None:
        return stream_id if stream_id in self.fast else None

    def on_data(self, stream: int, data: memoryview) -> None:
        self.data.setdefault(stream, bytearray()).extend(data)

    def on_window_update(self, stream_id: int, increment: int) -> bool:
        if stream_id in self.fast or stream_id == 0:
            self.windows.append((stream_id, increment))
            return True
        return False

    def on_frames(self, data: bytes) -> None:
        self.events += self.h2.receive_data(data)


@pytest.mark.parametrize("seed", range(8))
def test_reader_splits_h2_output_at_any_read_boundary(seed: int) -> None:
    """A real h2 client's byte stream (preface, SETTINGS, HEADERS, DATA on two streams,
    WINDOW_UPDATE, END_STREAM), cut at random places: the fast stream's bytes arrive in
    order and intact, the rest reaches h2 as a well-formed connection."""
    rnd = random.Random(seed)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 16})
    wire = bytearray(c.data_to_send())
    fast_sid, slow_sid = 1, 3
    for sid in (fast_sid, slow_sid):
        c.send_headers(sid, [(":method", "CONNECT"), (":authority", f"10.0.0.{sid}:80")])
    fast_payload = rnd.randbytes(40_000)
    slow_payload = rnd.randbytes(3_000)
    for i in range(0, len(fast_payload), 7_000):
        c.send_data(fast_sid, fast_payload[i : i + 7_000])
        c.increment_flow_control_window(100 + i, stream_id=None)
        if i == 14_000:
            c.send_data(slow_sid, slow_payload, pad_length=5)  # padded: always h2's
    c.send_data(fast_sid, b"last", end_stream=True)  # END_STREAM: h2's
    c.end_stream(slow_sid)
    wire += c.data_to_send()

    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    sink = Sink(server, {fast_sid})
    reader = FrameReader(sink, max_frame=1 << 16, preface=len(CLIENT_PREFACE))
    pos = 0
    while pos < len(wire):
        n = rnd.choice([1, 5, 9, 10, 100, 4096, 20_000])
        reader.feed(bytes(wire[pos : pos + n]))
        pos += n

    assert bytes(sink.data[fast_sid]) == fast_payload
    assert slow_sid not in sink.data
    conn_updates = [inc for sid, inc in sink.windows if sid == 0]
    assert conn_updates == [100 + i for i in range(0, 40_000, 7_000)]
    got = {sid: b"" for sid in (fast_sid, slow_sid)}
    ended: set[int] = set()
    for ev in sink.events:
        if isinstance(ev, h2.events.DataReceived):
            got[ev.stream_id] += ev.data
        elif isinstance(ev, h2.events.StreamEnded):
            ended.add(ev.stream_id)
    assert got == {fast_sid: b"last", slow_sid: slow_payload}
    assert ended == {fast_sid, slow_sid}
    requests = [ev for ev in sink.events if isinstance(ev, h2.events.RequestReceived)]
    assert [ev.stream_id for ev in requests] == [fast_sid, slow_sid]


def test_reader_refuses_a_frame_above_the_maximum() -> None:
    sink = Sink(h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)), {1})
    reader = FrameReader(sink, max_frame=1 << 14)
    with pytest.raises(FrameError) as err:
        reader.feed(data_header(1, (1 << 14) + 1))
    assert err.value.code == FRAME_SIZE_ERROR


def test_window_update_the_sink_declines_goes_to_h2() -> None:
    c, s = pair()
    sid = connect(c, s)
    sink = Sink(s, fast=set())
    reader = FrameReader(sink, max_frame=1 << 14)
    reader.feed(window_update(sid, 7))
    assert sink.windows == []
    updates = [e for e in sink.events if isinstance(e, h2.events.WindowUpdated)]
    assert [(e.stream_id, e.delta) for e in updates] == [(sid, 7)]
