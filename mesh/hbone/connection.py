"""HBONE: TCP streams tunnelled as HTTP/2 CONNECT over mutual TLS (Istio's wire protocol).

One `HboneConnection` is one TLS connection carrying many CONNECT streams; each stream is a
`mesh.stream.Endpoint`, so a tunnel is spliced to a TCP socket with callbacks only.

This is the asyncio glue around the sans-IO `mesh.hbone.core.HboneCore`, which owns the
protocol (h2, the CONNECT rules, limits, flow-control credit): here are the transport, the
TLS peer check, the futures the client awaits, the handler tasks and the timers. Output is
flushed once per event-loop turn, not once per frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import h2.connection
import h2.errors
import h2.exceptions

from mesh.hbone.core import (
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
from mesh.hbone.limits import ConnectionGate, HboneLimits, RefusedHook
from mesh.stream import Endpoint, EndpointBase
from mesh.tls import PeerIdentityError, check_identity, peer_identity

log = logging.getLogger("mesh.hbone")

WRITELINES_AT = 1 << 16
# Sent by a waypoint to the destination's ztunnel: the SPIFFE ID of the caller it acts for.
# The receiver believes it only when the TLS peer is a waypoint serving that destination.
SOURCE_PRINCIPAL_HEADER = "x-ambientmesh-source-principal"


# Says who the peer of a new transport is (its SPIFFE ID), or raises PeerIdentityError.
PeerCheck = Callable[[asyncio.BaseTransport], str]


def tls_peer(
    transport: asyncio.BaseTransport, expected_peers: frozenset[str] | None, trust_domain: str
) -> str:
    """The default PeerCheck: mutual TLS with ALPN h2 and a SPIFFE ID we accept."""
    ssl_obj = transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        raise PeerIdentityError("HBONE requires TLS")
    if ssl_obj.selected_alpn_protocol() != "h2":
        raise PeerIdentityError("peer did not negotiate ALPN h2")
    return check_identity(peer_identity(ssl_obj), expected_peers, trust_domain)


class HboneError(Exception):
    """A CONNECT that did not open; `status` is the HTTP status (0 when the connection died).
    `refused`: the server refused the stream unprocessed (REFUSED_STREAM: over its stream
    limit), so trying it again, elsewhere, is safe (RFC 9113 §8.7)."""

    def __init__(self, status: int, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused


class HboneStream(EndpointBase):
    """One CONNECT stream as an Endpoint; its protocol state is the core's `StreamState`."""

    def __init__(self, conn: HboneConnection, st: StreamState) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = st.stream_id
        self._st = st
        # server side: the task answering this CONNECT, cancelled if the stream is reset
        # before it was accepted (its dial is then for nobody)
        self.handler_task: asyncio.Task[None] | None = None
        self._accepted = False
        self.response: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
            conn._loop.create_future()
        )

    @property
    def bytes_received(self) -> int:
        return self._st.received

    @property
    def bytes_sent(self) -> int:
        return self._st.sent

    # -- events from the core --------------------------------------------------------------

    def _on_end(self) -> None:
        if self._peer is not None:
            self._peer.write_eof()
        else:
            self._early_eof = True

    def _on_reset(self) -> None:
        if self._peer is not None:
            self._peer.abort()
        task = self.handler_task
        if task is not None and not self._accepted and not task.done():
            task.cancel()  # the dial it is waiting on would be an upstream for nobody

    def _finish(self) -> None:
        if self.conn.client_side and not self.response.done():
            refused = self._st.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM
            why = "stream refused (server's stream limit)" if refused else "stream reset"
            self.response.set_exception(HboneError(0, why, refused=refused))
            self.response.exception()  # whoever awaits still gets it; nobody must
        if not self._done.done():
            self._done.set_result(None)

    def join(self, peer: Endpoint) -> None:
        """A stream reset before the join (the peer gave up while we were dialing) takes the
        newly joined upstream down with it: nothing else would ever close that one."""
        super().join(peer)
        if self._st.reset:
            peer.abort()
        else:
            self._st.sink = self._deliver

    def _deliver(self, data: memoryview, n: int) -> None:
        """The per-chunk path: the core hands received DATA straight here (see
        StreamState.sink), saving the event object and its dispatch on every chunk."""
        self._peer.write(data)  # type: ignore[union-attr]  # set before the sink is
        self.conn.core.consume(self._st, n)

    # -- Endpoint --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self.conn
        core = conn.core
        core.send(self._st, data)
        if core.events:
            conn._process(core.take_events())
        conn._schedule_flush()

    def write_eof(self) -> None:
        conn = self.conn
        conn.core.end_stream(self._st)
        conn._pump()
        conn._schedule_flush()

    def abort(self) -> None:
        if self._st.closed:
            return
        conn = self.conn
        conn.core.reset_stream(self._st)
        conn._pump()
        conn._schedule_flush()

    def pause_reading(self) -> None:
        self.conn.core.pause(self._st)

    def resume_reading(self) -> None:
        if self._st.unacked:
            self.conn.core.resume(self._st)
            self.conn._schedule_flush()
        else:
            self._st.paused = False


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
        stream = self.stream
        stream._accepted = True
        stream.conn.core.accept(stream._st)
        stream.conn._schedule_flush()
        return stream

    def reject(self, status: int, reason: str = "") -> None:
        self._answered = True
        conn = self.stream.conn
        conn.core.reject(self.stream._st, status, reason)
        conn._pump()
        conn._schedule_flush()


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
        check_peer: PeerCheck | None = None,
    ) -> None:
        """`check_peer` replaces the TLS peer check (`tls_peer`), e.g. for a transport
        without TLS in tests; the identity it returns is what handlers see."""
        self.client_side = client_side
        self.check_peer = check_peer
        self.limits = limits or HboneLimits()
        self.gate = gate
        self.on_refused = on_refused
        self._gated: str | None = None  # the peer IP counted in `gate`
        self.trust_domain = trust_domain
        self.expected_peers = expected_peers
        self.handler = handler
        self.on_idle = on_idle
        self.core = HboneCore(
            client_side=client_side, limits=self.limits, serving=handler is not None
        )
        self.transport: asyncio.Transport | None = None
        self.peer_identity = ""
        self.peer_address: tuple[str, int] | None = None
        self._streams: dict[int, HboneStream] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call
        # (CPython 3.11 checks for a fork), which strace showed once per request.
        self._loop = loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None
        # Server side, created at TCP accept: a handshake not done in time is reported (the
        # listener's own timeout closes it; we never see its transport).
        self._handshake_timer: asyncio.TimerHandle | None = (
            None
            if client_side
            else loop.call_later(self.limits.handshake_timeout * 1.05, self._handshake_expired)
        )

    @property
    def h2(self) -> h2.connection.H2Connection:
        return self.core.h2

    @property
    def streams_opened(self) -> int:
        return self.core.streams_opened

    @property
    def streams_refused(self) -> int:
        return self.core.streams_refused

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
        try:
            if self.check_peer is not None:
                self.peer_identity = self.check_peer(transport)
            else:
                self.peer_identity = tls_peer(transport, self.expected_peers, self.trust_domain)
        except PeerIdentityError as exc:
            log.warning("hbone: refusing peer %s: %s", self.peer_address, exc)
            if not self.ready.done():
                self.ready.set_exception(HboneError(0, str(exc)))
            self.transport.abort()
            return
        self.core.initiate(self.peer_identity)
        self._flush()
        if not self.client_side:
            self._arm_idle()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._process(self.core.receive_data(data))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gated is not None and self.gate is not None:
            self.gate.release(self._gated)
            self._gated = None
        for timer in (self._idle_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        self._process(self.core.connection_lost())
        for t in self._tasks:
            t.cancel()
        if not self.ready.done():
            self.ready.set_exception(HboneError(0, f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- core events -----------------------------------------------------------------------

    def _pump(self) -> None:
        if self.core.events:
            self._process(self.core.take_events())

    def _process(self, events: list[Event]) -> None:
        streams = self._streams
        for ev in events:
            if type(ev) is DataReceived:  # the per-byte path first, inline
                s = streams.get(ev.stream_id)
                if s is None:
                    if ev.flow_controlled:
                        self.core.consumed(ev.stream_id, ev.flow_controlled)
                    continue
                peer = s._peer
                if peer is not None:
                    peer.write(ev.data)
                else:
                    s._early.append(bytes(ev.data))
                if ev.flow_controlled:  # delivered (maybe pausing us): now credit decides
                    self.core.consume(s._st, ev.flow_controlled)
            elif isinstance(ev, StreamClosed):
                s = streams.pop(ev.stream_id, None)
                if s is not None:
                    s._finish()
                self._stream_finished()
            elif isinstance(ev, ConnectRequested):
                self._on_request(ev)
            elif isinstance(ev, StreamEnded):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._on_end()
            elif isinstance(ev, StreamReset):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._on_reset()
            elif isinstance(ev, ResponseReceived):
                s = streams.get(ev.stream_id)
                if s is not None and not s.response.done():
                    s.response.set_result((ev.status, ev.headers))
            elif isinstance(ev, (WriteBlocked, WriteUnblocked)):
                s = streams.get(ev.stream_id)
                if s is not None and s._peer is not None:
                    if isinstance(ev, WriteBlocked):
                        s._peer.pause_reading()
                    else:
                        s._peer.resume_reading()
            elif isinstance(ev, ConnectRejected):
                self._cancel_idle()
            elif isinstance(ev, StreamRefused):
                self._refused("streams", self.peer_address)
            elif isinstance(ev, ConnectionTerminated):
                if self.transport:
                    self.transport.close()
            elif isinstance(ev, ConnectionFailed):
                log.warning("hbone: protocol error from %s: %s", self.peer_address, ev.message)
                self._flush()
                if self.transport:
                    self.transport.close()

    def _on_request(self, ev: ConnectRequested) -> None:
        self._cancel_idle()
        st = self.core.stream(ev.stream_id)
        if st is None:  # reset by a later frame of the same read
            return
        stream = HboneStream(self, st)
        self._streams[ev.stream_id] = stream
        req = ConnectRequest(
            stream, ev.authority, ev.headers, self.peer_identity, self.peer_address
        )
        task = self._loop.create_task(self._handle(req))
        stream.handler_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, req: ConnectRequest) -> None:
        assert self.handler is not None
        try:
            await self.handler(req)
        except asyncio.CancelledError:
            if req.stream._st.reset:
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

    # -- output and timers -----------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One write per event-loop turn: all frames, as one buffer, so TLS makes full-size
        records instead of one per frame header."""
        self._flush_scheduled = False
        out = self.core.data_to_send()
        t = self.transport
        if not out or t is None or t.is_closing():
            return
        if len(out) == 1:
            t.write(out[0])
        elif len(out) > 2 and len(out[1]) >= WRITELINES_AT:
            t.writelines(out)  # big payloads: no join copy; a header is a tiny record
        else:
            t.write(b"".join(out))

    def _stream_finished(self) -> None:
        if self.core.streams:
            return
        if self.on_idle is not None:
            self.on_idle(self)
        if not self.client_side:
            self._arm_idle()

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _arm_idle(self) -> None:
        """Server side: a connection that carries no stream for `idle_timeout` is closed
        (a peer cannot park connections forever)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.core.streams:
            log.info("hbone: closing idle connection from %s", self.peer_address)
            self.close()

    # -- client API ------------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self.core.streams)

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
            st = self.core.open_stream(authority, list(headers))
        except h2.exceptions.H2Error as exc:
            raise HboneError(0, f"CONNECT {authority}: {exc}") from exc
        stream = HboneStream(self, st)
        self._streams[st.stream_id] = stream
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
            self.core.discard(st)
            self._pump()
            raise HboneError(status, f"CONNECT {authority}: {status} {reason}".rstrip())
        return stream

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.core.close()
            self._flush()
            self.transport.close()
