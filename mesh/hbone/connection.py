"""HBONE: TCP streams tunnelled as HTTP/2 CONNECT over mutual TLS (Istio's wire protocol).

One `HboneConnection` is one TLS connection carrying many CONNECT streams; each stream is a
`mesh.stream.Endpoint`, so a tunnel is spliced to a TCP socket with callbacks only.

Flow control is the back-pressure: received DATA is acknowledged (credit returned to the
sender) only while the joined endpoint is not paused, so a slow reader stops the sender at the
stream window instead of growing buffers. Sends are queued per stream and released as the
peer's windows allow. Output is flushed once per event-loop turn, not once per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

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
from mesh.hbone.limits import ConnectionGate, HboneLimits, RefusedHook
from mesh.stream import Endpoint, EndpointBase
from mesh.tls import PeerIdentityError, check_identity, peer_identity

log = logging.getLogger("mesh.hbone")

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 256 * 1024  # what we accept; what we send is bounded by the peer's setting
SEND_HIGH_WATER = 1 << 20
SEND_LOW_WATER = 1 << 18
# Credit for received DATA is returned in batches (one WINDOW_UPDATE per quarter window), not
# per frame: a 1 KiB request then costs no extra frame and no extra TLS record.
STREAM_UPDATE_AT = STREAM_WINDOW // 4
WRITELINES_AT = 1 << 16
CONNECTION_UPDATE_AT = CONNECTION_WINDOW // 4
# Sent by a waypoint to the destination's ztunnel: the SPIFFE ID of the caller it acts for.
# The receiver believes it only when the TLS peer is a waypoint serving that destination.
SOURCE_PRINCIPAL_HEADER = "x-ambientmesh-source-principal"
# What h2 is told it may open: h2 answers one stream too many with a GOAWAY that kills every
# stream of the connection, so it never decides; `_on_request` refuses the extra one alone.
_H2_STREAM_CEILING = 2**31 - 1


class HboneError(Exception):
    """A CONNECT that did not open; `status` is the HTTP status (0 when the connection died).
    `refused`: the server refused the stream unprocessed (REFUSED_STREAM: over its stream
    limit), so trying it again, elsewhere, is safe (RFC 9113 §8.7)."""

    def __init__(self, status: int, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused


class HboneStream(EndpointBase):
    """One CONNECT stream as an Endpoint."""

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._eof_pending = False
        self._paused = False  # our peer asked us to stop delivering
        self._unacked = 0  # bytes delivered while paused, not yet credited back
        self._peer_paused = False  # we asked the peer to stop (our send queue is full)
        self._ended_in = False
        self._ended_out = False
        # The lean DATA path (mesh.hbone.frames): h2 never sees this stream's DATA or
        # WINDOW_UPDATE frames once it is established, so its windows are kept here.
        self._fast_in = not conn.client_side  # client: once the 200 response arrived
        self._send_window = conn.h2.remote_settings.initial_window_size
        self._credit = 0  # received bytes not yet credited back to the peer
        self._reset = False  # ended by RST_STREAM (either side) or by the connection dying
        self._reset_code: int | None = None  # the peer's RST_STREAM error code
        # server side: the task answering this CONNECT, cancelled if the stream is reset
        # before it was accepted (its dial is then for nobody)
        self.handler_task: asyncio.Task[None] | None = None
        self._accepted = False
        self.response: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
            asyncio.get_running_loop().create_future()
        )

    # -- events from the connection ---------------------------------------------------------

    def _on_fast_data(self, data: memoryview) -> None:
        """Payload from the lean path: zero-copy slices of what TLS gave us."""
        n = len(data)
        self._recv += n
        if self._peer is not None:
            self._peer.write(data)
        else:
            self._early.append(bytes(data))
        if self._paused:
            self._unacked += n
        else:
            self._credit_back(n)

    def _credit_back(self, n: int) -> None:
        conn = self.conn
        self._credit += n
        if self._credit >= STREAM_UPDATE_AT:
            conn._emit(window_update(self.stream_id, self._credit))
            self._credit = 0
        conn._credit += n
        if conn._credit >= CONNECTION_UPDATE_AT:
            conn._emit(window_update(0, conn._credit))
            conn._credit = 0

    def _on_data(self, data: bytes, flow_len: int) -> None:
        """DATA that h2 parsed (END_STREAM, padded, or before the stream was established).
        Acknowledged to h2 at once, paused or not: h2 keeps its own windows for these, and
        they are the last frame of a stream or precede its first bytes."""
        self._recv += len(data)
        if self._peer is not None:
            self._peer.write(data)
        else:
            self._early.append(data)
        self.conn._ack(self.stream_id, flow_len)

    def _on_end(self) -> None:
        self._ended_in = True
        if self._peer is not None:
            self._peer.write_eof()
        else:
            self._early_eof = True
        self._check_done()

    def _on_reset(self, code: int | None = None) -> None:
        self._reset = True
        self._reset_code = code
        if self._peer is not None:
            self._peer.abort()
        task = self.handler_task
        if task is not None and not self._accepted and not task.done():
            task.cancel()  # the dial it is waiting on would be an upstream for nobody
        self._finish()

    def join(self, peer: Endpoint) -> None:
        """A stream reset before the join (the peer gave up while we were dialing) takes the
        newly joined upstream down with it: nothing else would ever close that one."""
        super().join(peer)
        if self._reset:
            peer.abort()

    def _finish(self) -> None:
        self.conn._streams.pop(self.stream_id, None)
        if self.conn.client_side and not self.response.done():
            refused = self._reset_code == h2.errors.ErrorCodes.REFUSED_STREAM
            why = "stream refused (server's stream limit)" if refused else "stream reset"
            self.response.set_exception(HboneError(0, why, refused=refused))
            self.response.exception()  # whoever awaits still gets it; nobody must
        if not self._done.done():
            self._done.set_result(None)
            self.conn._stream_finished()

    def _check_done(self) -> None:
        if self._ended_in and self._ended_out:
            self._finish()

    def _drain(self) -> None:
        """Send what the peer's windows allow; called on writes and on WINDOW_UPDATE."""
        conn = self.conn
        max_frame = conn.h2.max_outbound_frame_size
        while self._pending:
            chunk = self._pending[0]
            n = min(self._send_window, conn._send_window, max_frame, len(chunk))
            if n <= 0:
                break
            if n == len(chunk):
                self._pending.pop(0)
            else:
                self._pending[0] = chunk[n:]
                chunk = chunk[:n]
            conn._send_data(self, chunk)
            self._pending_bytes -= n
        if not self._pending and self._eof_pending:
            self._eof_pending = False
            self._end_out()
        if self._peer_paused and self._pending_bytes <= SEND_LOW_WATER and self._peer:
            self._peer_paused = False
            self._peer.resume_reading()
        self.conn._schedule_flush()

    def _end_out(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.h2.end_stream(self.stream_id)
        self._ended_out = True
        self.conn._schedule_flush()
        self._check_done()

    # -- Endpoint --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended_out or self._done.done() or not data:
            return
        if not isinstance(data, bytes):  # output is joined later: never keep a mutable buffer
            data = bytes(data)
        n = len(data)
        conn = self.conn
        if (
            not self._pending
            and n <= self._send_window
            and n <= conn._send_window
            and n <= conn.h2.max_outbound_frame_size
        ):
            conn._send_data(self, data)  # the common case: one frame, no queue
            return
        self._pending.append(memoryview(data))
        self._pending_bytes += n
        self._drain()
        if self._pending_bytes > SEND_HIGH_WATER and not self._peer_paused and self._peer:
            self._peer_paused = True
            self._peer.pause_reading()

    def write_eof(self) -> None:
        if self._done.done() or self._ended_out:
            return
        if self._pending:
            self._eof_pending = True
        else:
            self._end_out()

    def abort(self) -> None:
        if self._done.done():
            return
        self._reset = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.conn._schedule_flush()
        self._finish()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        if self._unacked:
            self._credit_back(self._unacked)
            self._unacked = 0
            self.conn._schedule_flush()


@dataclass
class ConnectRequest:
    """An inbound CONNECT, handed to the server's handler, which must `accept` or `reject`."""

    stream: HboneStream
    authority: str
    headers: dict[str, str]
    peer_identity: str
    peer_address: tuple[str, int] | None
    _answered: bool = field(default=False, repr=False)

    def accept(self) -> HboneStream:
        self._answered = True
        self.stream._accepted = True
        self.stream.conn._respond(self.stream.stream_id, 200, end=False)
        return self.stream

    def reject(self, status: int, reason: str = "") -> None:
        self._answered = True
        headers = [("x-hbone-error", reason)] if reason else []
        self.stream.conn._respond(self.stream.stream_id, status, end=True, extra=headers)
        self.stream._finish()


Handler = Callable[[ConnectRequest], Awaitable[None]]


class HboneConnection(asyncio.Protocol):
    """Both ends of an HBONE TLS connection; `client_side` decides the role."""

    def __init__(
        self,
        *,
        client_side: bool,
        trust_domain: str,
        expected_peers: frozenset[str] | None = None,
        handler: Handler | None = None,
        on_idle: Callable[[HboneConnection], None] | None = None,
        limits: HboneLimits | None = None,
        gate: ConnectionGate | None = None,
        on_refused: RefusedHook | None = None,
    ) -> None:
        self.client_side = client_side
        self.limits = limits or HboneLimits()
        self.gate = gate
        self.on_refused = on_refused
        self._gated: str | None = None  # the peer IP counted in `gate`
        self.trust_domain = trust_domain
        self.expected_peers = expected_peers
        self.handler = handler
        self.on_idle = on_idle
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        # What our first SETTINGS frame advertises (initiate_connection sends these values).
        self.h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_list_size,
            },
        )
        self.h2.decoder.max_header_list_size = self.limits.max_header_list_size
        self.transport: asyncio.Transport | None = None
        self.peer_identity = ""
        self.peer_address: tuple[str, int] | None = None
        self._streams: dict[int, HboneStream] = {}
        self._flush_scheduled = False
        self._out: list[bytes | memoryview] = []  # lean-path frames, after h2's earlier output
        self._send_window = 65535  # the peer's connection window for our DATA
        self._credit = 0  # connection-level credit not yet returned
        self._reader: FrameReader[HboneStream] = FrameReader(
            self, max_frame=MAX_FRAME, preface=0 if client_side else len(CLIENT_PREFACE)
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams_opened = 0
        self.streams_refused = 0
        loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None
        # Server side, created at TCP accept: a handshake not done in time is reported (the
        # listener's own timeout closes it; we never see its transport).
        self._handshake_timer: asyncio.TimerHandle | None = (
            None
            if client_side
            else loop.call_later(self.limits.handshake_timeout * 1.05, self._handshake_expired)
        )

    # -- asyncio.Protocol ------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.transport is None:
            self._refused("handshake", None)

    def _refused(self, reason: str, peer: tuple[str, int] | None) -> None:
        if self.on_refused is not None:
            self.on_refused(reason, peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer_address = transport.get_extra_info("peername")
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.gate is not None and not self.client_side:
            ip = self.peer_address[0] if self.peer_address else ""
            why = self.gate.admit(ip)
            if why is not None:
                log.warning("hbone: refusing connection from %s: %s limit", ip, why)
                self._refused(why, self.peer_address)
                if not self.ready.done():
                    self.ready.set_exception(HboneError(0, f"{why} limit"))
                    self.ready.exception()
                self.transport.abort()
                return
            self._gated = ip
        ssl_obj = transport.get_extra_info("ssl_object")
        try:
            if ssl_obj is None:
                raise PeerIdentityError("HBONE requires TLS")
            if ssl_obj.selected_alpn_protocol() != "h2":
                raise PeerIdentityError("peer did not negotiate ALPN h2")
            self.peer_identity = check_identity(
                peer_identity(ssl_obj), self.expected_peers, self.trust_domain
            )
        except PeerIdentityError as exc:
            log.warning("hbone: refusing peer %s: %s", self.peer_address, exc)
            if not self.ready.done():
                self.ready.set_exception(HboneError(0, str(exc)))
            self.transport.abort()
            return
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
        self._flush()
        if not self.client_side:
            self._arm_idle()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except (h2.exceptions.ProtocolError, FrameError) as exc:
            log.warning("hbone: protocol error from %s: %s", self.peer_address, exc)
            if isinstance(exc, FrameError):  # found by the lean path: h2 has not said GOAWAY
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(exc.code)
            self._flush()
            if self.transport:
                self.transport.close()
            return
        self._flush()

    # -- FrameSink: the lean path's callbacks (mesh.hbone.frames) ---------------------------

    def fast_stream(self, stream_id: int) -> HboneStream | None:
        st = self._streams.get(stream_id)
        if st is not None and st._fast_in and not st._ended_in:
            return st
        return None

    def on_data(self, stream: HboneStream, data: memoryview) -> None:
        if stream._done.done():  # reset meanwhile: the bytes still used connection window
            self._credit += len(data)
            return
        stream._on_fast_data(data)
        if stream._unacked > STREAM_WINDOW:  # what a paused stream holds stays bounded
            raise FrameError("DATA beyond the stream's flow-control window", FLOW_CONTROL_ERROR)

    def on_window_update(self, stream_id: int, increment: int) -> bool:
        if not increment:
            return False  # h2 answers the protocol error
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise FrameError("connection window above 2^31-1", FLOW_CONTROL_ERROR)
            for waiting in list(self._streams.values()):
                if waiting._pending:
                    waiting._drain()
            return True
        st = self._streams.get(stream_id)
        if st is None:
            return False  # not ours (closed, idle): h2 knows what that means
        st._send_window += increment
        if st._send_window > MAX_WINDOW:
            st.abort()  # a stream error: reset this stream only
            return True
        if st._pending:
            st._drain()
        return True

    def on_frames(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            self._dispatch(ev)

    def _emit(self, frame: bytes | memoryview) -> None:
        """Queue lean-path output behind whatever h2 has produced so far."""
        pending = self.h2.data_to_send()
        if pending:
            self._out.append(pending)
        self._out.append(frame)
        self._schedule_flush()

    def _send_data(self, stream: HboneStream, data: bytes | memoryview) -> None:
        n = len(data)
        stream._send_window -= n
        self._send_window -= n
        stream._sent += n
        self._emit(data_header(stream.stream_id, n))
        self._out.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gated is not None and self.gate is not None:
            self.gate.release(self._gated)
            self._gated = None
        for timer in (self._idle_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        for s in list(self._streams.values()):
            s._on_reset()
        for t in self._tasks:
            t.cancel()
        if not self.ready.done():
            self.ready.set_exception(HboneError(0, f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- h2 events -------------------------------------------------------------------------

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            changed = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None and changed.original_value is not None:
                delta = changed.new_value - changed.original_value
                for st in list(self._streams.values()):
                    st._send_window += delta
                    if delta > 0 and st._pending:
                        st._drain()
        elif isinstance(ev, h2.events.DataReceived):
            s = self._streams.get(ev.stream_id)
            if s is not None:
                s._on_data(ev.data, ev.flow_controlled_length)
            else:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self._streams.get(ev.stream_id)
            if s is not None:
                s._on_end()
        elif isinstance(ev, h2.events.StreamReset):
            s = self._streams.get(ev.stream_id)
            if s is not None:
                s._on_reset(ev.error_code)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self._streams.get(ev.stream_id)
            if s is not None and not s.response.done():
                hdrs = [(str(k), str(v)) for k, v in ev.headers]
                status = int(dict(hdrs).get(":status", "0"))
                s._fast_in = status == 200
                s.response.set_result((status, hdrs))
        elif isinstance(ev, h2.events.ConnectionTerminated) and self.transport:
            self.transport.close()

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        if len(self._streams) >= self.limits.max_streams:
            # What we advertised, enforced on this stream alone (also for streams the peer
            # sent before it saw our SETTINGS); the connection and its streams carry on.
            self.streams_refused += 1
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._schedule_flush()
            self._refused("streams", self.peer_address)
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        headers = {str(k): str(v) for k, v in ev.headers}
        stream = HboneStream(self, ev.stream_id)
        self._streams[ev.stream_id] = stream
        authority = headers.get(":authority", "")
        if headers.get(":method") != "CONNECT" or not authority or self.handler is None:
            self._respond(ev.stream_id, 405 if headers.get(":method") != "CONNECT" else 400, True)
            stream._finish()
            return
        req = ConnectRequest(stream, authority, headers, self.peer_identity, self.peer_address)
        task = asyncio.get_running_loop().create_task(self._handle(req))
        stream.handler_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, req: ConnectRequest) -> None:
        assert self.handler is not None
        try:
            await self.handler(req)
        except asyncio.CancelledError:
            if req.stream._reset:
                return  # the peer reset the stream: nobody is waiting for an answer
            raise
        except Exception:  # one bad stream never takes the connection down
            log.exception("hbone: handler failed for %s", req.authority)
            if not req._answered:
                req.reject(500, "internal error")
            else:
                req.stream.abort()
        else:
            if not req._answered:
                req.reject(500, "handler did not answer")

    # -- helpers for streams ---------------------------------------------------------------

    def _respond(
        self, stream_id: int, status: int, end: bool, extra: list[tuple[str, str]] | None = None
    ) -> None:
        try:
            self.h2.send_headers(
                stream_id, [(":status", str(status)), *(extra or [])], end_stream=end
            )
        except h2.exceptions.ProtocolError:
            return
        self._schedule_flush()

    def _ack(self, stream_id: int, n: int) -> None:
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One write per event-loop turn: all frames, as one buffer, so TLS makes full-size
        records instead of one per frame header."""
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        out = self._out
        t = self.transport
        if out:
            if data:
                out.append(data)
            self._out = []
            if t is None or t.is_closing():
                return
            if len(out) > 2 and len(out[1]) >= WRITELINES_AT:
                t.writelines(out)  # big payloads: no join copy; a header is a tiny record
            else:
                t.write(b"".join(out))
        elif data and t is not None and not t.is_closing():
            t.write(data)

    def _stream_finished(self) -> None:
        if self._streams:
            return
        if self.on_idle is not None:
            self.on_idle(self)
        if not self.client_side:
            self._arm_idle()

    def _arm_idle(self) -> None:
        """Server side: a connection that carries no stream for `idle_timeout` is closed
        (a peer cannot park connections forever)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(
            self.limits.idle_timeout, self._idle_expired
        )

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self._streams:
            log.info("hbone: closing idle connection from %s", self.peer_address)
            self.close()

    # -- client API ------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def usable(self) -> bool:
        return (
            self.ready.done()
            and not self.ready.exception()
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def open_stream(
        self,
        authority: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        response_timeout: float | None = None,
    ) -> HboneStream:
        """Send CONNECT and wait for the answer; raise HboneError unless it is 200.

        No answer within `response_timeout` resets the stream and raises HboneError(504)."""
        await self.ready
        try:
            sid = self.h2.get_next_available_stream_id()
            stream = HboneStream(self, sid)
            self.h2.send_headers(
                sid,
                [(":method", "CONNECT"), (":authority", authority), *headers],
                end_stream=False,
            )
        except h2.exceptions.H2Error as exc:
            raise HboneError(0, f"CONNECT {authority}: {exc}") from exc
        self._streams[sid] = stream
        self.streams_opened += 1
        self._flush()
        try:
            async with asyncio.timeout(response_timeout):
                status, hdrs = await stream.response
        except TimeoutError:
            stream.abort()
            why = f"CONNECT {authority}: no answer in {response_timeout}s"
            raise HboneError(504, why) from None
        except asyncio.CancelledError:
            stream.abort()
            raise
        if status != 200:
            reason = dict(hdrs).get("x-hbone-error", "")
            stream._finish()
            raise HboneError(status, f"CONNECT {authority}: {status} {reason}".rstrip())
        return stream

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.h2.close_connection()
            self._flush()
            self.transport.close()
