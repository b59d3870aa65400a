"""The HBONE protocol core, sans-IO: bytes in, events and bytes out (as h2, h11 and aioquic).

Everything HBONE decides lives here, so it can be tested by feeding bytes: the h2 state
machine, the CONNECT rules, the stream limit and its refusal, the header-list limit,
flow-control credit and the send windows, stream resets. What needs a loop (transport,
futures, tasks, timers, the TLS peer check) is `mesh.hbone.connection`'s, which passes the
verified peer identity in as a plain string.

`receive_data(bytes)` returns the events it caused; `data_to_send()` returns the buffers to
write, in order. Calls on a stream (`send`, `end_stream`, `reset_stream`, ...) may queue
events too; they wait in `events` until `take_events()`.

Flow control is the back-pressure: received DATA is credited back to the sender only while
the stream is not paused (`pause`/`resume`), so a slow reader stops the sender at the stream
window instead of growing buffers. As with h2's `acknowledge_received_data`, the caller
hands delivered DATA back with `consumed()`, so a pause asked for while delivering one event
already holds back the credit of the next one; a peer sending past the window of a paused
stream is a FLOW_CONTROL_ERROR. Sends are queued per stream and released as the peer's
windows allow; a queue above the high-water mark says `WriteBlocked`, below the low-water
mark `WriteUnblocked`.

DATA and WINDOW_UPDATE frames of established streams take the lean path
(`mesh.hbone.frames`): h2 never sees them, so their windows are kept here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mesh.hbone.frames import (
    CLIENT_PREFACE,
    FLOW_CONTROL_ERROR,
    MAX_WINDOW,
    FrameError,
    FrameReader,
    data_header,
    window_update,
)
from mesh.hbone.limits import HboneLimits

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 256 * 1024  # what we accept; what we send is bounded by the peer's setting
SEND_HIGH_WATER = 1 << 20
SEND_LOW_WATER = 1 << 18
# Credit for received DATA is returned in batches (one WINDOW_UPDATE per quarter window), not
# per frame: a 1 KiB request then costs no extra frame and no extra TLS record.
STREAM_UPDATE_AT = STREAM_WINDOW // 4
CONNECTION_UPDATE_AT = CONNECTION_WINDOW // 4
# What h2 is told it may open: h2 answers one stream too many with a GOAWAY that kills every
# stream of the connection, so it never decides; `_on_request` refuses the extra one alone.
_H2_STREAM_CEILING = 2**31 - 1

Output = bytes | memoryview


# -- events --------------------------------------------------------------------------------


@dataclass(slots=True)
class ConnectRequested:
    """A well-formed CONNECT (server side): answer with `accept` or `reject`."""

    stream_id: int
    authority: str
    headers: dict[str, str]


@dataclass(slots=True)
class ConnectRejected:
    """A request the core answered itself (not CONNECT: 405; no authority or nobody
    serving: 400); the stream is closed."""

    stream_id: int
    status: int


@dataclass(slots=True)
class StreamRefused:
    """A stream past the stream limit, reset with REFUSED_STREAM; the connection carries on."""

    stream_id: int


@dataclass(slots=True)
class ResponseReceived:
    """The answer to our CONNECT (client side); 200 opens the tunnel."""

    stream_id: int
    status: int
    headers: list[tuple[str, str]]


@dataclass(slots=True)
class DataReceived:
    """Tunnel payload; a zero-copy slice of the received bytes on the lean path. Once it is
    delivered, `flow_controlled` bytes go back through `consumed()` (0: h2 parsed this DATA
    and has credited it already)."""

    stream_id: int
    data: bytes | memoryview
    flow_controlled: int = 0


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The stream died under us: the peer's RST_STREAM (`error_code`), or the connection
    (None). Whatever the stream is joined to must go down too."""

    stream_id: int
    error_code: int | None


@dataclass(slots=True)
class StreamClosed:
    """The stream left the connection (both directions ended, reset, refused by its answer);
    emitted once per stream."""

    stream_id: int


@dataclass(slots=True)
class WriteBlocked:
    """The stream's send queue is above the high-water mark: stop feeding it."""

    stream_id: int


@dataclass(slots=True)
class WriteUnblocked:
    """The stream's send queue drained below the low-water mark."""

    stream_id: int


@dataclass(slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: the connection is over."""

    error_code: int


@dataclass(slots=True)
class ConnectionFailed:
    """The peer broke the protocol; a GOAWAY is queued and the connection must close."""

    message: str


Event = (
    ConnectRequested
    | ConnectRejected
    | StreamRefused
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamClosed
    | WriteBlocked
    | WriteUnblocked
    | ConnectionTerminated
    | ConnectionFailed
)


class StreamState:
    """One CONNECT stream's protocol state: windows, credit, the send queue, half-closes."""

    __slots__ = (
        "blocked",
        "closed",
        "credit",
        "ended_in",
        "ended_out",
        "eof_pending",
        "fast_in",
        "held",
        "paused",
        "pending",
        "pending_bytes",
        "received",
        "reset",
        "reset_code",
        "responded",
        "send_window",
        "sent",
        "sink",
        "stream_id",
        "unacked",
    )

    def __init__(self, stream_id: int, *, fast_in: bool, send_window: int) -> None:
        self.stream_id = stream_id
        # The lean path takes this stream's DATA (server: at once; client: after a 200).
        self.fast_in = fast_in
        self.send_window = send_window  # the peer's window for our DATA on this stream
        self.pending: list[memoryview] = []
        self.pending_bytes = 0
        self.eof_pending = False
        self.paused = False  # the reader asked us to stop crediting
        self.unacked = 0  # bytes consumed while paused, not yet credited back
        self.held = 0  # lean-path bytes handed out in events, not yet consumed
        self.credit = 0  # received bytes not yet credited back to the peer
        self.blocked = False  # our send queue is over the high-water mark
        self.ended_in = False
        self.ended_out = False
        self.reset = False  # ended by RST_STREAM (either side) or by the connection dying
        self.reset_code: int | None = None  # the peer's RST_STREAM error code
        self.responded = False  # client: the CONNECT's answer arrived
        self.closed = False
        self.received = 0
        self.sent = 0
        # Where this stream's lean-path DATA goes directly, without a DataReceived event:
        # `sink(data, n)` delivers and then hands the n bytes back with `consume`, as the
        # event's receiver would. Set once the stream is joined to its other end.
        self.sink: Callable[[memoryview, int], None] | None = None


class H2Connection(h2.connection.H2Connection):
    """h2's connection, remembering 1,024 closed streams instead of 65,536 (about 140 B
    each: 9 MB for one long-lived pooled connection, which a churn soak showed as steady
    growth). A few stream limits' worth is plenty to answer late frames of streams that just
    closed. (h2 sizes that table when the connection is made, hence a class attribute.)"""

    MAX_CLOSED_STREAMS = 1024

    def has_output(self) -> bool:
        """Whether `data_to_send()` would return anything. Asked on every flush and every
        lean-path frame, where calling data_to_send itself (an empty bytes and a new buffer
        each time) was a measurable part of a request's cost. h2 keeps its output in
        `_data_to_send` (4.x); a test pins that."""
        return bool(self._data_to_send)


class HboneCore:
    """One end of an HBONE connection's HTTP/2, without I/O. `serving`: CONNECTs are
    answered by someone (else the core rejects them with 400)."""

    def __init__(self, *, client_side: bool, limits: HboneLimits, serving: bool) -> None:
        self.client_side = client_side
        self.limits = limits
        self.serving = serving
        self.peer_identity = ""
        self.h2 = H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        # What our first SETTINGS frame advertises (initiate_connection sends these values).
        self.h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            },
        )
        self.h2.decoder.max_header_list_size = limits.max_header_list_size
        self.streams: dict[int, StreamState] = {}
        self.events: list[Event] = []
        self._out: list[Output] = []  # lean-path frames, after h2's earlier output
        self._send_window = 65535  # the peer's connection window for our DATA
        self._credit = 0  # connection-level credit not yet returned
        self._reader: FrameReader[StreamState] = FrameReader(
            self, max_frame=MAX_FRAME, preface=0 if client_side else len(CLIENT_PREFACE)
        )
        self.streams_opened = 0
        self.streams_refused = 0

    # -- the connection --------------------------------------------------------------------

    def initiate(self, peer_identity: str) -> None:
        """Start HTTP/2 with a peer whose identity the caller has verified."""
        self.peer_identity = peer_identity
        self.h2.initiate_connection()
        # Our SETTINGS frame now says max_streams; h2 itself must not enforce it (see
        # _H2_STREAM_CEILING): its own limit goes to the ceiling, applied at once.
        self.h2.local_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = _H2_STREAM_CEILING
        self.h2.local_settings.acknowledge()
        # Through update_settings, not initial values: h2 applies a larger inbound frame size
        # and window only when the peer acknowledges them.
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            }
        )
        # ...but h2 raises its inbound frame limit only on the receive_data call *after* the
        # ACK, so a peer sending the ACK and a large frame in one write would get
        # FRAME_SIZE_ERROR. We advertised the size: accept it from the start.
        self.h2.max_inbound_frame_size = MAX_FRAME
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; the events they caused (and any queued before)."""
        try:
            self._reader.feed(data)
        except UnicodeDecodeError as exc:  # h2 decodes header values as UTF-8 after HPACK
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self.events.append(ConnectionFailed(f"header value is not UTF-8: {exc.reason}"))
        except (h2.exceptions.ProtocolError, FrameError) as exc:
            if isinstance(exc, FrameError):  # found by the lean path: h2 has not said GOAWAY
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(exc.code)
            self.events.append(ConnectionFailed(str(exc)))
        return self.take_events()

    def take_events(self) -> list[Event]:
        events = self.events
        if events:
            self.events = []
        return events

    def data_to_send(self) -> list[Output]:
        """What to write, in order; as separate buffers, so big payloads need no join copy."""
        data = self.h2.data_to_send() if self.h2.has_output() else b""
        out = self._out
        if out:
            if data:
                out.append(data)
            self._out = []
            return out
        return [data] if data else []

    def close(self, error_code: int = 0) -> None:
        """Queue GOAWAY."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code)

    def connection_lost(self) -> list[Event]:
        """The transport is gone: every stream is reset."""
        for st in list(self.streams.values()):
            st.reset = True
            st.reset_code = None
            self.events.append(StreamReset(st.stream_id, None))
            self._close(st)
        return self.take_events()

    # -- streams ---------------------------------------------------------------------------

    def open_stream(self, authority: str, headers: list[tuple[str, str]]) -> StreamState:
        """Send CONNECT (client side); raises h2's errors (no stream ids left, closed)."""
        sid = self.h2.get_next_available_stream_id()
        st = StreamState(
            sid, fast_in=False, send_window=self.h2.remote_settings.initial_window_size
        )
        self.h2.send_headers(
            sid, [(":method", "CONNECT"), (":authority", authority), *headers], end_stream=False
        )
        self.streams[sid] = st
        self.streams_opened += 1
        return st

    def stream(self, stream_id: int) -> StreamState | None:
        return self.streams.get(stream_id)

    def accept(self, st: StreamState) -> None:
        self._respond(st.stream_id, 200, end=False)

    def reject(self, st: StreamState, status: int, reason: str = "") -> None:
        headers = [("x-hbone-error", reason)] if reason else []
        self._respond(st.stream_id, status, end=True, extra=headers)
        self._close(st)

    def discard(self, st: StreamState) -> None:
        """Forget a stream whose CONNECT was answered with an error (it ended there)."""
        self._close(st)

    def send(self, st: StreamState, data: bytes | bytearray | memoryview) -> None:
        if st.ended_out or st.closed or not data:
            return
        if not isinstance(data, bytes):  # output is joined later: never keep a mutable buffer
            data = bytes(data)
        n = len(data)
        if (
            not st.pending
            and n <= st.send_window
            and n <= self._send_window
            and n <= self.h2.max_outbound_frame_size
        ):
            self._send_data(st, data)  # the common case: one frame, no queue
            return
        st.pending.append(memoryview(data))
        st.pending_bytes += n
        self._drain(st)
        if st.pending_bytes > SEND_HIGH_WATER and not st.blocked:
            st.blocked = True
            self.events.append(WriteBlocked(st.stream_id))

    def end_stream(self, st: StreamState) -> None:
        """Half-close once the queued data is out."""
        if st.closed or st.ended_out:
            return
        if st.pending:
            st.eof_pending = True
        else:
            self._end_out(st)

    def reset_stream(self, st: StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if st.closed:
            return
        st.reset = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(st.stream_id, code)
        self._close(st)

    def pause(self, st: StreamState) -> None:
        """Stop crediting received DATA: the sender stops at the stream window."""
        st.paused = True

    def consumed(self, stream_id: int, n: int) -> None:
        """`n` bytes of a DataReceived were delivered: credit them back unless the stream is
        paused (then they are credited at `resume`)."""
        st = self.streams.get(stream_id)
        if st is None:  # closed meanwhile: the bytes still used connection window
            self._credit += n
            return
        self.consume(st, n)

    def consume(self, st: StreamState, n: int) -> None:
        """`consumed` for a caller that holds the stream's state (the per-chunk path)."""
        if st.closed:
            self._credit += n
            return
        st.held -= n
        if st.paused:
            st.unacked += n
        else:
            self._credit_back(st, n)

    def resume(self, st: StreamState) -> None:
        st.paused = False
        if st.unacked:
            self._credit_back(st, st.unacked)
            st.unacked = 0

    # -- FrameSink: the lean path's callbacks (mesh.hbone.frames) ---------------------------

    def fast_stream(self, stream_id: int) -> StreamState | None:
        st = self.streams.get(stream_id)
        if st is not None and st.fast_in and not st.ended_in:
            return st
        return None

    def on_data(self, st: StreamState, data: memoryview) -> None:
        n = len(data)
        if st.closed:  # reset meanwhile: the bytes still used connection window
            self._credit += n
            return
        st.received += n
        st.held += n
        if st.paused and st.unacked + st.held > STREAM_WINDOW:
            # what a paused stream holds stays bounded
            raise FrameError("DATA beyond the stream's flow-control window", FLOW_CONTROL_ERROR)
        sink = st.sink
        if sink is not None and not self.events:  # nothing queued before it: order kept
            sink(data, n)
        else:
            self.events.append(DataReceived(st.stream_id, data, n))

    def on_window_update(self, stream_id: int, increment: int) -> bool:
        if not increment:
            return False  # h2 answers the protocol error
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise FrameError("connection window above 2^31-1", FLOW_CONTROL_ERROR)
            for waiting in list(self.streams.values()):
                if waiting.pending:
                    self._drain(waiting)
            return True
        st = self.streams.get(stream_id)
        if st is None:
            return False  # not ours (closed, idle): h2 knows what that means
        st.send_window += increment
        if st.send_window > MAX_WINDOW:
            self.reset_stream(st)  # a stream error: reset this stream only
            return True
        if st.pending:
            self._drain(st)
        return True

    def on_frames(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            self._dispatch(ev)

    # -- internals -------------------------------------------------------------------------

    def _credit_back(self, st: StreamState, n: int) -> None:
        st.credit += n
        if st.credit >= STREAM_UPDATE_AT:
            self._emit(window_update(st.stream_id, st.credit))
            st.credit = 0
        self._credit += n
        if self._credit >= CONNECTION_UPDATE_AT:
            self._emit(window_update(0, self._credit))
            self._credit = 0

    def _emit(self, frame: Output) -> None:
        """Queue lean-path output behind whatever h2 has produced so far."""
        if self.h2.has_output():
            self._out.append(self.h2.data_to_send())
        self._out.append(frame)

    def _send_data(self, st: StreamState, data: Output) -> None:
        n = len(data)
        st.send_window -= n
        self._send_window -= n
        st.sent += n
        self._emit(data_header(st.stream_id, n))
        self._out.append(data)

    def _drain(self, st: StreamState) -> None:
        """Send what the peer's windows allow; called on writes and on WINDOW_UPDATE."""
        max_frame = self.h2.max_outbound_frame_size
        while st.pending:
            chunk = st.pending[0]
            n = min(st.send_window, self._send_window, max_frame, len(chunk))
            if n <= 0:
                break
            if n == len(chunk):
                st.pending.pop(0)
            else:
                st.pending[0] = chunk[n:]
                chunk = chunk[:n]
            self._send_data(st, chunk)
            st.pending_bytes -= n
        if not st.pending and st.eof_pending:
            st.eof_pending = False
            self._end_out(st)
        if st.blocked and st.pending_bytes <= SEND_LOW_WATER:
            st.blocked = False
            self.events.append(WriteUnblocked(st.stream_id))

    def _end_out(self, st: StreamState) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.end_stream(st.stream_id)
        st.ended_out = True
        self._check_done(st)

    def _check_done(self, st: StreamState) -> None:
        if st.ended_in and st.ended_out:
            self._close(st)

    def _close(self, st: StreamState) -> None:
        if st.closed:
            return
        st.closed = True
        self.streams.pop(st.stream_id, None)
        self.events.append(StreamClosed(st.stream_id))

    def _respond(
        self, stream_id: int, status: int, end: bool, extra: list[tuple[str, str]] | None = None
    ) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # reset meanwhile
            self.h2.send_headers(
                stream_id, [(":status", str(status)), *(extra or [])], end_stream=end
            )

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            changed = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None and changed.original_value is not None:
                delta = changed.new_value - changed.original_value
                for each in list(self.streams.values()):
                    each.send_window += delta
                    if delta > 0 and each.pending:
                        self._drain(each)
        elif isinstance(ev, h2.events.DataReceived):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                # h2 parsed it (END_STREAM, padded, or before the stream was established):
                # acknowledged to h2 at once, paused or not, since h2 keeps its own windows
                # for these and they are a stream's last frame or precede its first bytes.
                st.received += len(ev.data)
                self.events.append(DataReceived(ev.stream_id, ev.data))
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.ended_in = True
                self.events.append(StreamEnded(ev.stream_id))
                self._check_done(st)
        elif isinstance(ev, h2.events.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.reset = True
                st.reset_code = ev.error_code
                self.events.append(StreamReset(ev.stream_id, ev.error_code))
                self._close(st)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.ResponseReceived):
            st = self.streams.get(ev.stream_id)
            if st is not None and not st.responded:
                hdrs = [(str(k), str(v)) for k, v in ev.headers]
                status = int(dict(hdrs).get(":status", "0"))
                st.responded = True
                st.fast_in = status == 200
                self.events.append(ResponseReceived(ev.stream_id, status, hdrs))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.events.append(ConnectionTerminated(int(ev.error_code or 0)))

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        if len(self.streams) >= self.limits.max_streams:
            # What we advertised, enforced on this stream alone (also for streams the peer
            # sent before it saw our SETTINGS); the connection and its streams carry on.
            self.streams_refused += 1
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.events.append(StreamRefused(ev.stream_id))
            return
        headers = {str(k): str(v) for k, v in ev.headers}
        st = StreamState(
            ev.stream_id,
            fast_in=not self.client_side,
            send_window=self.h2.remote_settings.initial_window_size,
        )
        self.streams[ev.stream_id] = st
        authority = headers.get(":authority", "")
        method = headers.get(":method")
        if method != "CONNECT" or not authority or not self.serving:
            status = 405 if method != "CONNECT" else 400
            self._respond(ev.stream_id, status, True)
            self.events.append(ConnectRejected(ev.stream_id, status))
            self._close(st)
            return
        self.events.append(ConnectRequested(ev.stream_id, authority, headers))
