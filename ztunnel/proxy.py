"""The node proxy's three connection roles: inbound HBONE, outbound, inbound plaintext.

One small class per role (DESIGN.md §6), all reading the current config snapshot once per
connection and splicing sockets and HBONE streams with callbacks (mesh.stream). Every failure
is contained to its connection: logged, counted, answered with the right status; nothing a
peer sends can take the node proxy down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import cast

from certs.ca import CertificateAuthority
from certs.spiffe import SpiffeId, node_id
from certs.svid import Svid
from mesh import ktls
from mesh.accesslog import AccessRecord, log_access
from mesh.authz import AuthzRequest, authorize
from mesh.config.model import MtlsMode, Pod, Service
from mesh.config.snapshot import Snapshot
from mesh.hbone import ConnectRequest, HboneError, HbonePool
from mesh.hbone.pool import ClientContext, ListenerContext
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint, join
from mesh.tls import client_context, server_context

log = logging.getLogger("ztunnel")

SO_ORIGINAL_DST = 80
HBONE_PORT = 15008


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination an app connected to before redirect (BPF getsockopt or netfilter)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class Identities:
    """SVIDs and TLS contexts per identity, from a local CA (single host and tests).

    The CA-service client with rotation slots in behind the same two methods. With `ktls`,
    contexts are kTLS ones (mesh.ktls): same checks, records handled by the kernel."""

    def __init__(
        self, ca: CertificateAuthority, ttl: timedelta = timedelta(hours=24), *, ktls: bool = False
    ) -> None:
        self.ca = ca
        self.ttl = ttl
        self.ktls = ktls
        self._svids: dict[str, Svid] = {}
        self._client: dict[str, ClientContext] = {}
        self._server: dict[str, ClientContext] = {}

    def svid(self, identity: str) -> Svid:
        s = self._svids.get(identity)
        if s is None or time.time() >= s.refresh_at.timestamp():
            # Rotation at half life: new connections get the new certificate; live ones keep
            # the session they negotiated, so nothing in flight breaks.
            s = self._svids[identity] = self.ca.issue(identity, self.ttl)
            self._client.pop(identity, None)
            self._server.pop(identity, None)
        return s

    def client_context(self, identity: str) -> ClientContext:
        svid = self.svid(identity)
        ctx = self._client.get(identity)
        if ctx is None:
            make = ktls.client_context if self.ktls else client_context
            ctx = self._client[identity] = make(svid, self.ca.bundle_pem)
        return ctx

    def server_context(self, identity: str) -> ClientContext:
        svid = self.svid(identity)
        ctx = self._server.get(identity)
        if ctx is None:
            make = ktls.server_context if self.ktls else server_context
            ctx = self._server[identity] = make(svid, self.ca.bundle_pem)
        return ctx

    def listener_context(self, identity: str) -> ListenerContext:
        """For a listener that outlives certificates: every handshake switches to the context
        of the identity's current SVID, so new connections get the rotated certificate while
        live ones keep theirs. (Our clients always send SNI, which triggers the switch.)"""
        if self.ktls:
            return lambda: cast(ktls.KtlsContext, self.server_context(identity))
        base = self.server_context(identity)
        assert isinstance(base, ssl.SSLContext)

        def switch(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _c: object) -> None:
            obj.context = cast(ssl.SSLContext, self.server_context(identity))

        base.sni_callback = switch
        return base

    def dump(self) -> list[dict[str, str]]:
        return [
            {"identity": i, "serial": hex(s.serial), "not_after": s.not_after.isoformat()}
            for i, s in sorted(self._svids.items())
        ]


@dataclass
class Node:
    """What the roles share: the node's name, its config, identities, pool, metrics."""

    name: str
    snapshot: Callable[[], Snapshot]
    identities: Identities
    metrics: MeshMetrics
    trust_domain: str = "cluster.local"
    hbone_port: int = HBONE_PORT
    pool: HbonePool = field(init=False)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.pool = HbonePool(self.identities.client_context, trust_domain=self.trust_domain)

    @property
    def identity(self) -> str:
        return node_id(self.trust_domain, self.name)

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        """Tasks are owned here and cancelled on shutdown: none is fire-and-forget."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _finish(
    node: Node,
    labels: ConnectionLabels,
    a: Endpoint,
    b: Endpoint,
    started: float,
    record: dict[str, object],
) -> None:
    node.metrics.tcp_closed(labels, a.bytes_received, a.bytes_sent)
    _log(
        record,
        bytes_sent=a.bytes_received,
        bytes_received=a.bytes_sent,
        duration_s=time.monotonic() - started,
    )


def _log(record: dict[str, object], **fields: object) -> None:
    """One access-log line from what a role gathered plus how the connection ended."""
    log_access(AccessRecord(**record, **fields))  # type: ignore[arg-type]


async def _connect_app(ip: str, port: int) -> TcpEndpoint:
    _, ep = await asyncio.get_running_loop().create_connection(TcpEndpoint, ip, port)
    return ep


class InboundHbone:
    """:15008: verify the caller (done by the TLS layer), authorize, deliver to the pod."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def __call__(self, req: ConnectRequest) -> None:
        snap = self.node.snapshot()
        started = time.monotonic()
        host, _, port_s = req.authority.rpartition(":")
        try:
            port = int(port_s)
            ipaddress.IPv4Address(host)
        except ValueError:
            req.reject(400, f"bad authority {req.authority!r}")
            return
        pod = snap.pod_by_ip(host)
        if pod is None or pod.node != self.node.name:
            req.reject(404, f"{host} is not a workload on node {self.node.name}")
            return
        peer = SpiffeId.parse(req.peer_identity)
        src_ip = req.headers.get("forwarded", "").removeprefix("for=") or (
            req.peer_address[0] if req.peer_address else ""
        )
        decision = authorize(
            snap.policies_for(pod),
            AuthzRequest(req.peer_identity, peer.namespace, src_ip, port),
            l7=False,
        )
        labels = ConnectionLabels.build(
            reporter="destination",
            source=snap.pod_by_ip(src_ip),
            source_principal=req.peer_identity,
            destination=pod,
            mtls=True,
            response_flags="-" if decision.allowed else "DENY",
            trust_domain=snap.trust_domain,
        )
        record: dict[str, object] = {
            "src": src_ip,
            "dst": req.authority,
            "src_identity": req.peer_identity,
            "dst_identity": snap.identity(pod),
            "service": None,
            "mtls": True,
            "policy": decision.policy,
        }
        self.node.metrics.tcp_opened(labels)
        if not decision.allowed:
            req.reject(403, f"denied: {decision.reason}")
            self.node.metrics.tcp_closed(labels, 0, 0)
            _log(
                record,
                bytes_sent=0,
                bytes_received=0,
                duration_s=0.0,
                verdict="deny",
                response_flags="DENY",
            )
            return
        try:
            app = await _connect_app(host, port)
        except OSError as exc:
            req.reject(503, f"{req.authority}: {exc.strerror or exc}")
            self.node.metrics.tcp_closed(labels, 0, 0)
            return
        stream = req.accept()
        join(stream, app)
        await asyncio.gather(stream.done, app.done)
        _finish(self.node, labels, stream, app, started, {**record, "verdict": "allow"})


@dataclass(frozen=True)
class Route:
    """Where an outbound connection goes, decided once from the snapshot."""

    kind: str  # "hbone" | "passthrough" | "refuse"
    ip: str = ""
    port: int = 0
    hbone_addr: tuple[str, int] = ("", 0)
    peer: str = ""
    service: Service | None = None
    dst_pod: Pod | None = None
    reason: str = ""


def route_outbound(
    snap: Snapshot, src: Pod | None, ip: str, port: int, hbone_port: int = HBONE_PORT
) -> Route:
    """VIP → an endpoint (or the service's waypoint); mesh pods over HBONE, others plain."""
    svc: Service | None = None
    found = snap.service_by_vip(ip, port)
    if found is not None:
        svc, sp = found
        wp = snap.waypoint_for_service(svc)
        if wp is not None and src is not None and snap.is_ambient(src):
            pods = snap.waypoint_pods(wp)
            if not pods or pods[0].ip is None:
                return Route("refuse", reason=f"waypoint {wp.key} has no ready pod")
            w = pods[0]
            return Route("hbone", ip, port, (w.ip, wp.port), snap.identity(w), svc, w)  # type: ignore[arg-type]
        eps = snap.endpoints(svc, sp.port)
        if not eps:
            return Route("refuse", reason=f"service {svc.key} has no ready endpoints")
        ep = eps[hash((ip, port, time.monotonic_ns())) % len(eps)]
        ip, port = ep.pod.ip or ip, ep.port
    dst = snap.pod_by_ip(ip)
    if dst is None or not snap.is_ambient(dst) or src is None or not snap.is_ambient(src):
        return Route("passthrough", ip, port, service=svc, dst_pod=dst)
    dst_node = snap.node(dst.node) if dst.node else None
    if dst_node is not None and dst_node.address:
        return Route(
            "hbone", ip, port, (dst_node.address, hbone_port),
            node_id(snap.trust_domain, dst_node.name), svc, dst,
        )  # fmt: skip
    return Route("hbone", ip, port, (ip, hbone_port), snap.identity(dst), svc, dst)


class _Redirected:
    """A listener for redirected connections: finds where each was originally going, then
    hands it to the role's `handle`. Outbound (15001) and plaintext inbound (15006) differ
    only in what they do next."""

    role = "redirected"

    def __init__(
        self,
        node: Node,
        resolve: Callable[[socket.socket], tuple[str, int]] = original_dst,
    ) -> None:
        self.node = node
        self.resolve = resolve

    def protocol(self) -> TcpEndpoint:
        return TcpEndpoint(on_made=lambda ep: self.node.spawn(self._serve(ep)))

    async def _serve(self, ep: TcpEndpoint) -> None:
        t = ep.transport
        if t is None:
            return
        started = time.monotonic()
        src_ip = (t.get_extra_info("peername") or ("", 0))[0]
        try:
            dst_ip, dst_port = self.resolve(t.get_extra_info("socket"))
        except OSError as exc:
            log.warning("%s from %s: no original destination: %s", self.role, src_ip, exc)
            ep.abort()
            return
        await self.handle(ep, src_ip, dst_ip, dst_port, started)

    async def handle(
        self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int, started: float
    ) -> None:
        raise NotImplementedError


class Outbound(_Redirected):
    """:15001: each accepted connection is tunnelled or passed through, by the snapshot."""

    role = "outbound"

    async def handle(
        self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int, started: float
    ) -> None:
        snap = self.node.snapshot()
        src = snap.pod_by_ip(src_ip)
        r = route_outbound(snap, src, dst_ip, dst_port, self.node.hbone_port)
        record: dict[str, object] = {
            "src": src_ip,
            "dst": f"{dst_ip}:{dst_port}",
            "src_identity": snap.identity(src) if src else None,
            "dst_identity": r.peer or None,
            "service": r.service.hostname if r.service else None,
            "mtls": r.kind == "hbone",
            "reporter": "source",
        }
        labels = ConnectionLabels.build(
            reporter="source", source=src, destination=r.dst_pod, service=r.service,
            mtls=r.kind == "hbone", trust_domain=snap.trust_domain,
        )  # fmt: skip
        self.node.metrics.tcp_opened(labels)
        upstream: Endpoint
        try:
            if r.kind == "refuse":
                raise HboneError(503, r.reason)
            if r.kind == "passthrough":
                upstream = await _connect_app(r.ip, r.port)
            else:
                assert src is not None
                upstream = await self.node.pool.connect(
                    snap.identity(src), r.hbone_addr, f"{r.ip}:{r.port}",
                    expected_peers=frozenset({r.peer}),
                    headers=[("forwarded", f"for={src_ip}")],
                )  # fmt: skip
        except (HboneError, OSError) as exc:
            log.info("outbound %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            self.node.metrics.tcp_closed(labels, 0, 0)
            status = exc.status if isinstance(exc, HboneError) else 0
            _log(
                record,
                bytes_sent=0,
                bytes_received=0,
                duration_s=time.monotonic() - started,
                verdict="deny" if status == 403 else "error",
                response_flags="DENY" if status == 403 else "UF",
            )
            return
        join(ep, upstream)
        await asyncio.gather(ep.done, upstream.done)
        _finish(self.node, labels, ep, upstream, started, {**record, "verdict": "allow"})


class InboundPlaintext(_Redirected):
    """:15006: traffic to a local pod that did not come through the mesh.

    STRICT refuses it; PERMISSIVE applies L4 policy with no principal and delivers."""

    role = "plaintext"

    async def handle(
        self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int, started: float
    ) -> None:
        snap = self.node.snapshot()
        pod = snap.pod_by_ip(dst_ip)
        record: dict[str, object] = {
            "src": src_ip, "dst": f"{dst_ip}:{dst_port}", "src_identity": None,
            "dst_identity": snap.identity(pod) if pod else None, "service": None, "mtls": False,
        }  # fmt: skip
        if pod is None or pod.node != self.node.name:
            ep.abort()
            return
        mode = snap.mtls_mode(pod, dst_port)
        decision = authorize(
            snap.policies_for(pod), AuthzRequest(None, None, src_ip, dst_port), l7=False
        )
        allowed = mode is not MtlsMode.STRICT and decision.allowed
        labels = ConnectionLabels.build(
            reporter="destination", source=snap.pod_by_ip(src_ip), destination=pod,
            response_flags="-" if allowed else "DENY", trust_domain=snap.trust_domain,
        )  # fmt: skip
        self.node.metrics.tcp_opened(labels)
        if not allowed:
            why = "STRICT mTLS" if mode is MtlsMode.STRICT else decision.reason
            log.info("plaintext %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, why)
            ep.abort()
            self.node.metrics.tcp_closed(labels, 0, 0)
            _log(
                record,
                bytes_sent=0,
                bytes_received=0,
                duration_s=0.0,
                verdict="deny",
                response_flags="DENY",
                policy=decision.policy,
            )
            return
        try:
            app = await _connect_app(dst_ip, dst_port)
        except OSError:
            ep.abort()
            self.node.metrics.tcp_closed(labels, 0, 0)
            return
        join(ep, app)
        await asyncio.gather(ep.done, app.done)
        _finish(self.node, labels, ep, app, started, {**record, "verdict": "allow"})
