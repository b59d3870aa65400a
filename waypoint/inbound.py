"""The waypoint's HBONE side (:15008): each CONNECT stream is one downstream HTTP connection.

The caller is a ztunnel acting for a mesh workload: TLS has verified its certificate against
the trust bundle and trust domain, and its SPIFFE ID (the source workload's identity) is what
L7 policy and telemetry see. The `:authority` is the Service VIP:port the client dialled; a
CONNECT for a service this waypoint does not serve is refused (400) before any byte flows.
After `200`, the first bytes decide the protocol (HTTP/2 preface or HTTP/1.1) and the stream
is handed to `H2Server` or `H1Server`, whose requests run through `RequestHandler`.

Each stream runs under the waypoint's `Limits`; past `max_connections` streams at once a new
CONNECT is answered 503 (flag OM) and the ones already open keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mesh.authz import waypoint_policies, waypoint_request_authns
from mesh.config.model import Service
from mesh.config.snapshot import Snapshot
from mesh.hbone import ConnectRequest
from mesh.hbone.forwarded import forwarded_for
from mesh.identity.spiffe import SpiffeId
from mesh.netpolicy import waypoint_http_rules
from mesh.requestauthn import authenticator_for
from mesh.stream import Endpoint
from waypoint.detect import detect
from waypoint.h1 import H1Server, H1ServerExchange
from waypoint.h2 import H2Server, H2ServerExchange
from waypoint.limits import OVERLOAD, TIMEOUT, Limits, Refusal
from waypoint.request import RequestHandler, StreamContext
from waypoint.service import ServiceRoutes
from waypoint.wire import WireConn

log = logging.getLogger("waypoint.inbound")

__all__ = ["WaypointInbound", "serve_stream"]


class _Sniffer(WireConn):
    """Holds the first bytes of a stream until they say which HTTP version it speaks."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = b""
        self.eof = False
        self.lost = False
        self.ready = self._done  # resolved once we know (or the stream ended)

    def data_from_wire(self, data: bytes) -> None:
        self.buf += data
        if detect(self.buf) is not None and not self._done.done():
            self._done.set_result(None)

    def eof_from_wire(self) -> None:
        self.eof = True
        if not self._done.done():
            self._done.set_result(None)

    def wire_lost(self) -> None:
        self.lost = True
        self.eof_from_wire()


async def serve_stream(
    wire: Endpoint, ctx: StreamContext, handler: RequestHandler, limits: Limits | None = None
) -> None:
    """Run one downstream HTTP connection on `wire` (an accepted CONNECT stream, or any
    Endpoint) until it ends."""
    limits = limits or Limits()

    def refused(r: Refusal) -> None:
        handler.refused(ctx, r)

    sniff = _Sniffer()
    wire.join(sniff)
    sniff.join(wire)
    try:
        # A stream that never says which HTTP it speaks is a slowloris too.
        async with asyncio.timeout(limits.headers_timeout):
            await sniff.ready
    except TimeoutError:
        refused(Refusal(0, TIMEOUT, "headers_timeout", "no request in time"))
        wire.abort()
        return
    if sniff.lost:
        return
    if sniff.eof and not sniff.buf:
        wire.write_eof()
        return
    proto = detect(sniff.buf) or "http/1.1"
    if proto == "h2":

        async def on_h2(ex: H2ServerExchange) -> None:
            await handler(ctx, ex)

        h2s = H2Server(on_h2, limits, refused)
        h2s.join(wire)
        h2s.start()  # the server preface is our first frame, before we answer anything
        wire.join(h2s)
        h2s.write(sniff.buf)
        if sniff.eof:
            h2s.write_eof()
        await h2s.run()
    else:

        async def on_h1(ex: H1ServerExchange) -> None:
            await handler(ctx, ex)

        h1s = H1Server(on_h1, limits, refused)
        wire.join(h1s)
        h1s.join(wire)
        h1s.write(sniff.buf)
        if sniff.eof:
            h1s.write_eof()
        await h1s.run()


class WaypointInbound:
    """The CONNECT handler of one waypoint (namespace/name)."""

    def __init__(
        self,
        namespace: str,
        name: str,
        routes: Callable[[], ServiceRoutes],
        handler: RequestHandler,
        limits: Limits | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.routes = routes
        self.handler = handler
        self.limits = limits or Limits()
        self.streams = 0
        self.active = 0  # downstream HTTP connections being served now

    def _serves(self, snap: Snapshot, svc: Service) -> bool:
        wp = snap.waypoint_for_service(svc)
        return wp is not None and (wp.namespace, wp.name) == (self.namespace, self.name)

    async def __call__(self, req: ConnectRequest) -> None:
        sr = self.routes()
        try:
            caller_ns = SpiffeId.parse(req.peer_identity).namespace
        except ValueError:
            caller_ns = None
        found = sr.for_authority(req.authority, caller_ns)
        if found is None:
            req.reject(400, f"{req.authority} is not a service VIP:port")
            return
        svc, port, table = found
        snap = sr.snapshot
        if not self._serves(snap, svc):
            req.reject(
                400, f"service {svc.key} is not served by waypoint {self.namespace}/{self.name}"
            )
            return
        src_ip = forwarded_for(req.headers.get("forwarded", "")) or ""
        wp = snap.waypoint(self.namespace, self.name)
        assert wp is not None  # _serves found it
        policies = waypoint_policies(snap, wp, svc)  # once per stream, not per request
        ctx = StreamContext(
            req.peer_identity,
            src_ip,
            svc,
            port,
            sr,
            table,
            policies,
            caller_ns,
            authenticator_for(snap, waypoint_request_authns(snap, wp, svc)),
            waypoint_http_rules(snap, svc, port, src_ip),
        )
        if self.active >= self.limits.max_connections:
            detail = f"{self.active} connections open (max_connections)"
            self.handler.refused(ctx, Refusal(503, OVERLOAD, "max_connections", detail))
            req.reject(503, detail)
            return
        self.streams += 1
        self.active += 1
        try:
            await serve_stream(req.accept(), ctx, self.handler, self.limits)
        finally:
            self.active -= 1
