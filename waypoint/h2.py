"""HTTP/2 on a wire, both ends, with `h2`: `H2Server` (downstream) and `H2Client` (upstream).

Each stream's body is a `Body`; received DATA is credited back to the peer only when the
forwarding coroutine has taken it from the queue, so the HTTP/2 window is the back-pressure.
Sending waits for the stream's and connection's send windows. Trailers (gRPC's grpc-status)
travel as a final HEADERS frame with END_STREAM in both directions.

The server side holds against hostile clients within `Limits`: streams past the advertised
MAX_CONCURRENT_STREAMS are refused one by one (REFUSED_STREAM, the connection kept; h2 itself
would kill the whole connection, so its own check is bypassed), a header list over the limit
is a connection error (HPACK state is shared), too many header fields a 431, and floods of
control frames (PING, SETTINGS: each makes us answer) or of streams reset as soon as opened
(rapid reset, CVE-2023-44487: the reset cancels the stream's handler and with it its upstream
work) end in GOAWAY ENHANCE_YOUR_CALM. A header block still open (CONTINUATION flood) is
bounded by h2 to 64 frames, and here to the header size limit and the headers timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mesh.hbone.core import H2Connection
from waypoint.limits import OVERLOAD, PROTOCOL_ERROR, TIMEOUT, Limits, OnRefused, Refusal
from waypoint.wire import (
    Body,
    ExchangeState,
    Headers,
    RequestHead,
    ResponseHead,
    StreamReset,
    WireConn,
    content_length,
    end_to_end,
)

log = logging.getLogger("waypoint.h2")

STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 8 << 20
MAX_FRAME = 1 << 16
MAX_STREAMS = 1000


def _split(headers: Iterable[tuple[str, str]]) -> tuple[dict[str, str], Headers]:
    pseudo: dict[str, str] = {}
    regular: Headers = []
    for k, v in headers:
        if k[:1] == ":":
            pseudo[k] = v
        else:
            regular.append((k, v))
    return pseudo, regular


def _out_headers(headers: Headers) -> Headers:
    """h2 refuses connection-specific headers; `te` is allowed only as "trailers"."""
    return [(k, v) for k, v in end_to_end(headers)]


class H2Stream:
    """One stream's receive queue and send-window waiter."""

    __slots__ = ("body", "conn", "sid", "window")

    def __init__(self, conn: H2Conn, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.body = Body(lambda n: conn._ack(sid, n))
        self.window: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.window is not None and not self.window.done():
            self.window.set_result(None)


class _ServerConnection(H2Connection):
    """h2 answers a stream past our MAX_CONCURRENT_STREAMS by killing the whole connection
    (and before our SETTINGS are acknowledged it applies its own default of 100): H2Server
    counts streams itself and refuses the extra ones with REFUSED_STREAM instead."""

    @property
    def open_inbound_streams(self) -> int:
        h2.connection.H2Connection.open_inbound_streams.fget(self)  # type: ignore[attr-defined]
        return 0  # (the accessor above also forgets closed streams: keep calling it)


class H2Conn(WireConn):
    """What both ends share: the h2 state machine, batched output, flow-controlled sends."""

    def __init__(self, *, client_side: bool) -> None:
        super().__init__()
        cls = H2Connection if client_side else _ServerConnection
        self.h2 = cls(h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8"))
        self.streams: dict[int, H2Stream] = {}
        self._flush_scheduled = False
        self.dead = False

    def _settings(self) -> dict[h2.settings.SettingCodes | int, int]:
        return {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        }

    def start(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(self._settings())
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        # h2 raises its frame-size limit for received frames only at the start of the
        # receive_data call after the ACK: a peer that sends the SETTINGS ACK and a larger
        # DATA frame in one segment (grpcio does) would get FRAME_SIZE_ERROR. We accept
        # MAX_FRAME from the start; being lenient before the ACK is harmless.
        self.h2.max_inbound_frame_size = MAX_FRAME
        self.flush()

    # -- output ----------------------------------------------------------------------------

    def flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data:
            self.send(data)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _ack(self, sid: int, n: int) -> None:
        if self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.h2.acknowledge_received_data(n, sid)
            self.schedule_flush()

    async def send_data(self, st: H2Stream, data: bytes, *, end: bool = False) -> None:
        """`data` as DATA frames, as the flow-control windows allow; with `end`, the last
        frame carries END_STREAM."""
        view = memoryview(data)
        off, total = 0, len(data)
        while off < total:
            if self.dead:
                raise StreamReset("connection closed")
            try:
                window = min(
                    self.h2.local_flow_control_window(st.sid), self.h2.max_outbound_frame_size
                )
            except (h2.exceptions.ProtocolError, KeyError) as exc:
                raise StreamReset(f"stream {st.sid} closed") from exc
            if window <= 0:
                st.window = asyncio.get_running_loop().create_future()
                try:
                    await st.window
                finally:
                    st.window = None
                continue
            n = min(window, total - off)
            chunk = data if n == total else view[off : off + n].tobytes()
            try:
                self.h2.send_data(st.sid, chunk, end_stream=end and off + n == total)
            except h2.exceptions.ProtocolError as exc:
                raise StreamReset(f"stream {st.sid}: {exc}") from exc
            off += n
            self.schedule_flush()
            await self.drain()

    def end_stream(self, st: H2Stream, trailers: Headers | None) -> None:
        try:
            if trailers:
                self.h2.send_headers(st.sid, _out_headers(trailers), end_stream=True)
            else:
                self.h2.end_stream(st.sid)
        except h2.exceptions.ProtocolError as exc:
            raise StreamReset(f"stream {st.sid}: {exc}") from exc
        self.schedule_flush()

    def reset_stream(
        self, sid: int, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.CANCEL
    ) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.h2.reset_stream(sid, code)
        st = self.streams.pop(sid, None)
        if st is not None:
            st.body.fail(StreamReset("stream reset"))
            st.wake()
        self.schedule_flush()
        self._stream_closed(sid)

    # -- input -----------------------------------------------------------------------------

    def data_from_wire(self, data: bytes) -> None:
        if self.dead:
            return
        try:
            events = self._receive(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("h2: protocol error: %s", exc)
            self.protocol_error(exc)
            self.flush()
            self._lost(f"protocol error: {exc}")
            self.close_wire()
            return
        for ev in events:
            if self.dead:
                break  # a flood ended the connection part-way through this batch
            self.dispatch(ev)
        self.flush()

    def _receive(self, data: bytes) -> list[h2.events.Event]:
        try:
            return list(self.h2.receive_data(data))
        except UnicodeDecodeError as exc:
            # h2 decodes header values as UTF-8 after HPACK: one that is not is the peer's
            # protocol error, ending this HTTP/2 connection only (never the HBONE connection
            # under it, which carries other pods' streams)
            raise h2.exceptions.ProtocolError(f"header value is not UTF-8: {exc.reason}") from None

    def dispatch(self, ev: Any) -> None:
        if isinstance(ev, h2.events.DataReceived):
            st = self.streams.get(ev.stream_id)
            pad = ev.flow_controlled_length - len(ev.data)
            if st is None:
                self._ack(ev.stream_id, ev.flow_controlled_length)
                return
            if pad:
                self._ack(ev.stream_id, pad)
            st.body.feed(ev.data)
            if ev.stream_ended is not None:
                st.body.end()
                self._remote_ended(ev.stream_id)
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.wake()
            else:
                for st in self.streams.values():
                    st.wake()
        elif isinstance(ev, h2.events.TrailersReceived):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                _, trailers = _split([(str(k), str(v)) for k, v in ev.headers])
                st.body.end(trailers)
                self._remote_ended(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None and not st.body.ended:
                st.body.end()
                self._remote_ended(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                st.body.fail(StreamReset(f"stream reset by peer ({ev.error_code!r})"))
                st.wake()
                self._peer_reset(ev.stream_id)
                self._stream_closed(ev.stream_id)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.control_frame()
            for st in self.streams.values():
                st.wake()  # a larger initial window may unblock senders
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._lost(f"GOAWAY ({ev.error_code!r})")
            self.close_wire()
        else:
            self.other_event(ev)

    def eof_from_wire(self) -> None:
        self._lost("connection closed")
        self.close_wire()

    def wire_lost(self) -> None:
        self._lost("connection reset")
        self._mark_lost()

    def _lost(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        for sid, st in list(self.streams.items()):
            st.body.fail(StreamReset(why))
            st.wake()
            self._peer_reset(sid)
        self.streams.clear()
        self.connection_gone()

    # -- for subclasses --------------------------------------------------------------------

    def other_event(self, ev: Any) -> None:
        pass

    def control_frame(self) -> None:
        pass

    def protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        pass

    def _remote_ended(self, sid: int) -> None:
        pass

    def _peer_reset(self, sid: int) -> None:
        pass

    def _stream_closed(self, sid: int) -> None:
        pass

    def connection_gone(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Downstream


class H2ServerExchange(ExchangeState):
    protocol = "h2"

    def __init__(self, conn: H2Server, st: H2Stream, head: RequestHead) -> None:
        self.conn = conn
        self.st = st
        self.head = head
        self.body = st.body
        self._head_sent = False
        self._sent = 0
        self.finished = False

    async def send_head(
        self, head: ResponseHead, first: bytes = b"", *, last: bool = False
    ) -> None:
        self._head_sent = True
        hs = [(":status", str(head.status)), *_out_headers(head.headers)]
        end = head.end_stream or (last and not first)
        try:
            self.conn.h2.send_headers(self.st.sid, hs, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise StreamReset(f"stream {self.st.sid}: {exc}") from exc
        if end:
            self.finished = True
            self.conn._local_ended(self.st.sid)
        self.conn.schedule_flush()
        if first and not self.finished:
            # frames of one loop turn leave in one write anyway
            self._sent += len(first)
            await self.conn.send_data(self.st, first, end=last)
            if last:
                self.finished = True
                self.conn._local_ended(self.st.sid)
        await self.conn.drain()

    async def send_data(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self._sent += len(data)
        await self.conn.send_data(self.st, data)

    async def finish(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.conn.end_stream(self.st, trailers)
        self.conn._local_ended(self.st.sid)
        await self.conn.drain()

    def reset(self) -> None:
        if not self.finished:
            self.finished = True
            self.conn.reset_stream(self.st.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)


class H2Server(H2Conn):
    """A downstream HTTP/2 connection: one handler task per stream, owned by the connection
    (cancelled when a stream is reset or the connection dies)."""

    def __init__(
        self,
        handler: Callable[[H2ServerExchange], Awaitable[None]],
        limits: Limits | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        super().__init__(client_side=False)
        self.handler = handler
        self.limits = limits or Limits()
        self.on_refused = on_refused
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._ended: dict[int, int] = {}  # sid -> directions finished (2 = both)
        self._idle = asyncio.Event()
        self._idle.set()
        self.opened = 0  # streams handed to the handler
        self.early_resets = 0  # of those, reset by the client before their answer ended
        self.refused = 0  # streams refused past max_concurrent_streams
        self._control = 0  # control frames in the current flood window
        loop = asyncio.get_running_loop()
        self._window_end = loop.time() + self.limits.flood_window
        self._last = loop.time()
        self._idle_timer: asyncio.TimerHandle | None = loop.call_later(
            self.limits.idle_timeout, self._idle_check
        )
        self._block_timer: asyncio.TimerHandle | None = None
        # Before our SETTINGS are acknowledged h2 would apply its default (64 KiB).
        self.h2.decoder.max_header_list_size = self.limits.max_header_bytes

    def _settings(self) -> dict[h2.settings.SettingCodes | int, int]:
        return {
            **super()._settings(),
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
        }

    def _refuse(
        self, status: int, flag: str, reason: str, detail: str, *, log: bool = True
    ) -> None:
        if self.on_refused is not None:
            self.on_refused(Refusal(status, flag, reason, detail, log=log))

    def calm(self, reason: str, detail: str, flag: str = OVERLOAD) -> None:
        """GOAWAY ENHANCE_YOUR_CALM: this client costs more than it may."""
        if self.dead:
            return
        log.info("h2: closing a connection: %s", detail)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self._refuse(0, flag, reason, detail)
        self._lost(detail)
        self.close_wire()

    def protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        dos = isinstance(exc, h2.exceptions.DenialOfServiceError)
        reason = "header_too_large" if dos else "h2_protocol_error"
        self._refuse(0, PROTOCOL_ERROR, reason, str(exc))

    def control_frame(self) -> None:
        now = asyncio.get_running_loop().time()
        if now > self._window_end:
            self._window_end = now + self.limits.flood_window
            self._control = 0
        self._control += 1
        if self._control > self.limits.max_control_frames:
            self.calm("control_frame_flood", "too many PING/SETTINGS frames")

    def data_from_wire(self, data: bytes) -> None:
        self._last = asyncio.get_running_loop().time()
        super().data_from_wire(data)
        if not self.dead:
            self._check_header_block()

    def _check_header_block(self) -> None:
        """A header block still open (HEADERS/CONTINUATION without END_HEADERS) is bounded in
        size (h2 bounds only its frame count: 64 frames of up to MAX_FRAME bytes) and in time
        (a block that never ends is a slowloris)."""
        pending = getattr(self.h2.incoming_buffer, "_headers_buffer", None) or []
        if not pending:
            if self._block_timer is not None:
                self._block_timer.cancel()
                self._block_timer = None
            return
        size = sum(len(f.data) for f in pending)
        if size > self.limits.max_header_bytes:
            self.calm("header_too_large", f"header block over {size} bytes", PROTOCOL_ERROR)
        elif self._block_timer is None:
            self._block_timer = asyncio.get_running_loop().call_later(
                self.limits.headers_timeout, self._block_timeout
            )

    def _block_timeout(self) -> None:
        self._block_timer = None
        if getattr(self.h2.incoming_buffer, "_headers_buffer", None):
            self.calm("headers_timeout", "header block not finished in time", TIMEOUT)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.dead or self.closed:
            return
        loop = asyncio.get_running_loop()
        left = self._last + self.limits.idle_timeout - loop.time()
        if self._tasks or left > 0:
            self._idle_timer = loop.call_later(max(left, 1.0), self._idle_check)
            return
        log.debug("h2: closing an idle connection")
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self.flush()
        self._lost("idle timeout")
        self.close_wire()

    def connection_gone(self) -> None:
        for t in (self._idle_timer, self._block_timer):
            if t is not None:
                t.cancel()
        self._idle_timer = self._block_timer = None

    def other_event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2.events.PingReceived):
            # (PRIORITY is not counted: browsers flag it on every HEADERS, and h2 handles it
            # without answering or storing anything.)
            self.control_frame()

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        if len(self._tasks) >= self.limits.max_concurrent_streams:
            # Streams whose handler still runs count, reset or not (a reset stream's upstream
            # work is being cancelled): the extra one is refused, the connection kept.
            self.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            # One access-log line per connection: a client hammering the limit must not turn
            # each refused stream into a line (the metric counts them all).
            self._refuse(
                0, OVERLOAD, "max_concurrent_streams", f"stream {sid} over the stream limit",
                log=self.refused == 0,
            )  # fmt: skip
            # Refused streams cost little, but a client that keeps meeting the limit (its
            # reset streams' handlers are still unwinding) counts toward rapid reset too.
            self.refused += 1
            self._check_resets()
            return
        # h2 hands names and values over as str already (header_encoding is set): no copy
        hs: Any = ev.headers
        pseudo, regular = _split(hs)
        if len(regular) + len(pseudo) > self.limits.max_headers:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.send_headers(sid, [(":status", "431")], end_stream=True)
                if ev.stream_ended is None:
                    self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
            self.schedule_flush()
            r = Refusal(431, PROTOCOL_ERROR, "too_many_headers", "too many header fields",
                        pseudo.get(":method", "-"), pseudo.get(":path", "-")[:256])  # fmt: skip
            if self.on_refused is not None:
                self.on_refused(r)
            return
        st = H2Stream(self, sid)
        self.streams[sid] = st
        try:
            length = content_length(regular)
        except ValueError:
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        te = any(k == "te" and v == "trailers" for k, v in regular)
        head = RequestHead(
            pseudo.get(":method", "GET"),
            pseudo.get(":path", "/"),
            pseudo.get(":authority") or next((v for k, v in regular if k == "host"), ""),
            end_to_end(regular),
            scheme=pseudo.get(":scheme", "http"),
            te_trailers=te,
            content_length=length,
            end_stream=ev.stream_ended is not None,
        )
        if ev.stream_ended is not None:
            st.body.end()
            self._ended[sid] = 1
        ex = H2ServerExchange(self, st, head)
        task = asyncio.get_running_loop().create_task(self._serve(ex))
        self._tasks[sid] = task
        # Bookkeeping by callback, not in _serve's `finally`: a task cancelled before its
        # first step (HEADERS and RST_STREAM in one read: rapid reset) never runs its body.
        task.add_done_callback(functools.partial(self._task_done, sid))
        self.opened += 1
        self._idle.clear()

    async def _serve(self, ex: H2ServerExchange) -> None:
        try:
            await self.handler(ex)
            if not ex.finished:
                ex.reset()
        except StreamReset:
            ex.reset()
        except Exception:  # a bug in one request never takes the connection down
            log.exception("h2: request on stream %d failed", ex.st.sid)
            ex.reset()

    def _task_done(self, sid: int, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(sid, None)
        if not self._tasks:
            self._idle.set()

    def _local_ended(self, sid: int) -> None:
        self._count_end(sid)

    def _remote_ended(self, sid: int) -> None:
        self._count_end(sid)

    def _count_end(self, sid: int) -> None:
        n = self._ended.get(sid, 0) + 1
        if n >= 2:
            self._ended.pop(sid, None)
            self.streams.pop(sid, None)
        else:
            self._ended[sid] = n

    def _stream_closed(self, sid: int) -> None:
        self._ended.pop(sid, None)

    def _peer_reset(self, sid: int) -> None:
        task = self._tasks.get(sid)
        if task is not None:
            task.cancel()  # and with it the request's upstream attempt
            if not self.dead:  # (not a stream failed by the connection's loss)
                self.early_resets += 1
                self._check_resets()

    def _check_resets(self) -> None:
        """Envoy's rule for premature resets: past `rapid_resets`, when at least half the
        connection's streams ended that way, the connection goes."""
        bad = self.early_resets + self.refused
        if bad >= self.limits.rapid_resets and bad * 2 >= self.opened + self.refused:
            self.calm(
                "rapid_reset",
                f"{self.early_resets} streams reset early, {self.refused} refused, "
                f"of {self.opened + self.refused}",
            )

    async def run(self) -> None:
        """Serve until the client goes away (`start` was called when the wire was joined);
        then cancel what is still running."""
        try:
            await self._done
        finally:
            for t in list(self._tasks.values()):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks.values()), timeout=5)

    def eof_from_wire(self) -> None:
        # The client half-closed: streams still answering may finish, then we close.
        self._lost("client closed the connection")
        self.close_wire()


# ---------------------------------------------------------------------------------------------
# Upstream


class H2ClientExchange:
    def __init__(self, conn: H2Client, st: H2Stream) -> None:
        self.conn = conn
        self.st = st
        self.body = st.body
        self.response: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.finished = False

    async def send_data(self, data: bytes) -> None:
        if data:
            await self.conn.send_data(self.st, data)

    async def finish(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.conn.end_stream(self.st, trailers)
        self.conn._local_end(self.st.sid)
        await self.conn.drain()

    def reset(self) -> None:
        if self.st.sid in self.conn.streams:
            self.conn.reset_stream(self.st.sid)

    def release(self) -> None:
        if self.st.sid in self.conn.streams and not (self.finished and self.st.body.ended):
            self.reset()


class H2Client(H2Conn):
    """An upstream HTTP/2 connection shared by many requests to one backend."""

    def __init__(self, on_gone: Callable[[H2Client], None] | None = None) -> None:
        super().__init__(client_side=True)
        self.on_gone = on_gone
        self._ex: dict[int, H2ClientExchange] = {}
        self._local_done: set[int] = set()

    @property
    def has_room(self) -> bool:
        cap = min(MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)
        return not self.dead and not self.closed and len(self.streams) < cap

    def open(self, head: RequestHead) -> H2ClientExchange:
        sid = self.h2.get_next_available_stream_id()
        hs = [
            (":method", head.method),
            (":scheme", head.scheme),
            (":authority", head.authority),
            (":path", head.target),
            *[(k, v) for k, v in _out_headers(head.headers) if k != "content-length"],
        ]
        if head.te_trailers:
            hs.append(("te", "trailers"))
        if head.content_length is not None:
            hs.append(("content-length", str(head.content_length)))
        st = H2Stream(self, sid)
        self.streams[sid] = st
        ex = self._ex[sid] = H2ClientExchange(self, st)
        try:
            self.h2.send_headers(sid, hs, end_stream=head.end_stream)
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(sid, None)
            self._ex.pop(sid, None)
            raise StreamReset(f"cannot open a stream: {exc}") from exc
        if head.end_stream:
            ex.finished = True
            self._local_end(sid)
        self.schedule_flush()
        return ex

    def other_event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            ex = self._ex.get(ev.stream_id)
            if ex is not None and not ex.response.done():
                pseudo, regular = _split([(str(k), str(v)) for k, v in ev.headers])
                status = int(pseudo.get(":status", "502"))
                ended = ev.stream_ended is not None
                ex.response.set_result(ResponseHead(status, end_to_end(regular), ended))
                if ended:
                    ex.body.end()
                    self._remote_ended(ev.stream_id)

    def _fail(self, sid: int, why: str) -> None:
        ex = self._ex.pop(sid, None)
        if ex is not None and not ex.response.done():
            ex.response.set_exception(StreamReset(why))
            ex.response.exception()

    def _peer_reset(self, sid: int) -> None:
        self._fail(sid, "upstream reset the stream")

    def _stream_closed(self, sid: int) -> None:
        self._fail(sid, "stream closed")
        self._local_done.discard(sid)

    def _local_end(self, sid: int) -> None:
        self._local_done.add(sid)
        self._maybe_forget(sid)

    def _remote_ended(self, sid: int) -> None:
        self._maybe_forget(sid)

    def _maybe_forget(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is not None and st.body.ended and sid in self._local_done:
            self.streams.pop(sid, None)
            self._ex.pop(sid, None)
            self._local_done.discard(sid)

    def connection_gone(self) -> None:
        for sid in list(self._ex):
            self._fail(sid, "upstream connection closed")
        if self.on_gone is not None:
            self.on_gone(self)
