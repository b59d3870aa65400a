"""Outbound (:15001): each redirected connection is tunnelled over HBONE or passed through.

The route is decided once per connection from the snapshot (`route_outbound`, pure and unit
tested): a Service VIP becomes one of its ready endpoints, or the service's waypoint when it
has one; a destination pod in the mesh is reached over HBONE with the *source pod's* identity
(at its node's ztunnel when the node has an address, else at the pod's own :15008); anything
else passes through as plain TCP, from inside the source pod's netns when the listener is
in-pod, so the pod's own routes apply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from mesh.config.model import Pod, Service
from mesh.config.snapshot import Snapshot
from mesh.hbone import HboneError
from mesh.hbone.nexthop import next_hop
from mesh.metrics import ConnectionLabels
from mesh.netpolicy import Decision, Direction, decide
from mesh.ports import HBONE_PORT
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting
from ztunnel.proxy.local import LocalAdmission, admit_local, dial_local
from ztunnel.proxy.node import DialRefused, LiveInbound, Redirected, splice

log = logging.getLogger("ztunnel.outbound")

__all__ = ["LiveOutbound", "Outbound", "Route", "egress_decision", "route_outbound"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where an outbound connection goes, decided once from the snapshot."""

    kind: str  # "hbone" | "passthrough" | "refuse"
    ip: str = ""
    port: int = 0
    hbone_addr: tuple[str, int] = ("", 0)
    peer: str = ""  # the identity the HBONE server must present
    service: Service | None = None
    dst_pod: Pod | None = None
    reason: str = ""
    waypoint: bool = False  # the HBONE goes to the service's waypoint, not to `dst_pod`

    @property
    def authority(self) -> str:
        return f"{self.ip}:{self.port}"


def route_outbound(
    snap: Snapshot,
    src: Pod | None,
    ip: str,
    port: int,
    hbone_port: int = HBONE_PORT,
    pick: random.Random | None = None,
) -> Route:
    """VIP → an endpoint (or the service's waypoint); mesh pods over HBONE, others plain."""
    rnd = pick or random
    meshed_src = src is not None and snap.is_ambient(src)
    svc: Service | None = None
    found = snap.service_by_vip(ip, port)
    if found is not None:
        svc, sp = found
        wp = snap.waypoint_for_service(svc) if meshed_src else None
        if wp is not None:
            pods = [p for p in snap.waypoint_pods(wp) if p.ip]
            if not pods:
                return Route("refuse", service=svc, reason=f"waypoint {wp.key} has no ready pod")
            w = pods[rnd.randrange(len(pods))] if len(pods) > 1 else pods[0]
            assert w.ip is not None
            # The waypoint terminates HBONE itself (its pods are not captured): dial it
            # directly, with the VIP as the authority so it can route by service.
            return Route(
                "hbone", ip, port, (w.ip, wp.port), snap.identity(w), svc, w, waypoint=True
            )
        eps = snap.endpoints(svc, sp.port)
        if not eps:
            return Route("refuse", service=svc, reason=f"service {svc.key} has no ready endpoints")
        ep = eps[rnd.randrange(len(eps))] if len(eps) > 1 else eps[0]
        ip, port = ep.pod.ip or ip, ep.port
    dst = snap.pod_by_ip(ip)
    if dst is None or not snap.is_ambient(dst) or not meshed_src:
        return Route("passthrough", ip, port, service=svc, dst_pod=dst)
    hop = next_hop(snap, dst, ip, node=dst.node, hbone_port=hbone_port)
    assert hop is not None  # the pod is known
    return Route("hbone", ip, port, hop[0], hop[1], svc, dst)


def egress_decision(snap: Snapshot, src: Pod, dst_ip: str, dst_port: int, r: Route) -> Decision:
    """The egress policy verdict on where the connection really goes. Like Cilium's socket-LB,
    a Service VIP is judged by the endpoint picked (the kernel admitted the VIP because some
    endpoint is allowed: this one may not be); through a waypoint, by the service's endpoints
    (the waypoint picks one per request)."""
    svc = r.service
    if svc is not None and r.kind == "hbone" and r.ip == dst_ip and snap.waypoint_for_service(svc):
        d: Decision | None = None
        for ep in snap.endpoints(svc, dst_port):
            if ep.pod.ip:
                d = decide(snap, src, ep.pod.ip, ep.port, Direction.EGRESS, authenticated=True)
                if d.allowed:
                    return d
        if d is not None:
            return d
    return decide(snap, src, r.ip, r.port, Direction.EGRESS, authenticated=r.kind == "hbone")


class LiveOutbound:
    """Enrolled pods' outbound connections in flight. The kernel refuses new connects a policy
    denies; these are the ones opened before the change: `enforce` closes those the new
    snapshot no longer allows (as Istio does when its policies change)."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._live: dict[int, tuple[str, str, int, Route, Callable[[], None]]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(
        self, pod_key: str, dst_ip: str, dst_port: int, r: Route, close: Callable[[], None]
    ) -> int:
        token = next(self._ids)
        self._live[token] = (pod_key, dst_ip, dst_port, r, close)
        return token

    def discard(self, token: int) -> None:
        self._live.pop(token, None)

    def enforce(self, snap: Snapshot) -> int:
        """Close every live connection `snap`'s policies deny; returns how many."""
        closed = 0
        for token, (key, dst_ip, dst_port, r, close) in list(self._live.items()):
            src = snap.pod(*key.split("/", 1))
            if src is None:
                continue  # the pod left: unenrolment closes its listeners
            d = egress_decision(snap, src, dst_ip, dst_port, r)
            if not d.allowed:
                log.info("closing %s -> %s:%s: %s (%s)", key, dst_ip, dst_port, d.reason, d.policy)
                self._live.pop(token, None)
                close()
                closed += 1
        return closed


def _peer_port(ep: TcpEndpoint) -> int | None:
    """The app's own source port (the redirected socket's peer), for the flow record."""
    t = ep.transport
    peer = t.get_extra_info("peername") if t is not None else None
    return int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None


class Outbound(Redirected):
    """The outbound role. Node-level listener: the source pod is found by the connection's
    source address. In-pod listener (`pod_key`): the source is that pod, whatever address the
    redirected socket shows (BPF connects come from 127.0.0.1).

    A meshed destination enrolled on this node, reached without a waypoint, is delivered
    locally (`ztunnel.proxy.local`) unless `node.local_delivery` is off: the inbound side's
    decisions and record are made here, and no HBONE is spoken."""

    role = "outbound"
    live: LiveOutbound | None = None  # set for enrolled pods: egress policy is enforced

    def _local_target(self, r: Route) -> Pod | None:
        """The destination pod when this connection can be delivered locally: over HBONE it
        would reach this very ztunnel's inbound side (the pod is on this node and, for in-pod
        listeners, enrolled here), and no waypoint stands in between."""
        node = self.node
        dst = r.dst_pod
        if not node.local_delivery or r.kind != "hbone" or r.waypoint or dst is None:
            return None
        if dst.node != node.name or dst.ip != r.ip:
            return None
        if self.netns is not None and node.netns_of(dst.key) is None:
            return None  # in-pod capture, destination not enrolled with us: not ours to serve
        return dst

    async def handle(self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int) -> None:
        node = self.node
        snap = node.snapshot()
        if self.pod_key is not None:
            ns, _, name = self.pod_key.partition("/")
            src = snap.pod(ns, name)
        else:
            src = snap.pod_by_ip(src_ip)
        if src is not None and src.ip:
            src_ip = src.ip
        r = route_outbound(snap, src, dst_ip, dst_port, node.hbone_port)
        mtls = r.kind == "hbone"
        local = self._local_target(r) if src is not None else None
        acct = Accounting(
            node.metrics,
            ConnectionLabels.build(
                reporter="source",
                source=src,
                destination=r.dst_pod,
                service=r.service,
                destination_principal=r.peer or None,
                mtls=mtls,
                trust_domain=snap.trust_domain,
            ),
            reporter="source",
            src=src_ip,
            dst=f"{dst_ip}:{dst_port}",
            src_identity=snap.identity(src) if src is not None and mtls else None,
            dst_identity=r.peer or None,
            service=r.service.hostname if r.service else None,
            mtls=mtls,
            flows=node.flows, source=src, destination=r.dst_pod, upstream=(r.ip, r.port),
            src_port=_peer_port(ep) if node.flows is not None else None,
        )  # fmt: skip
        upstream: Endpoint
        admitted: LocalAdmission | None = None
        try:
            if r.kind == "refuse":
                raise HboneError(503, r.reason)
            # In-pod listeners (BPF capture) sit behind the kernel's connect() check and
            # re-check the endpoint picked; the node-level listener (netfilter capture) has
            # no such check in front of it, so it decides for every egress-isolated pod.
            if src is not None and (
                self.live is not None
                or (src.ip is not None and node.egress_isolation.isolated(snap, src.ip))
            ):
                d = egress_decision(snap, src, dst_ip, dst_port, r)
                if not d.allowed:
                    node.metrics.policy_denied(d.policy or "-", "egress", "ztunnel")
                    raise HboneError(403, f"{d.reason} ({d.policy})")
            if local is not None:
                assert src is not None
                admitted = admit_local(node, snap, src, src_ip, local, r.ip, r.port)
                if admitted.status:
                    log.info("local %s (%s) -> %s:%s %s", snap.identity(src), src_ip, r.ip,
                             r.port, admitted.reason)  # fmt: skip
                    admitted.acct.refused("deny", "DENY")
                    raise HboneError(admitted.status, admitted.reason)
                upstream = await dial_local(node, local, r.ip, r.port)
            elif r.kind == "passthrough":
                upstream = await node.connect_tcp(r.ip, r.port, self.netns)
            else:
                assert src is not None
                with node.dial_slot():
                    upstream = await node.pool.connect(
                        snap.identity(src), r.hbone_addr, r.authority,
                        expected_peers=frozenset({r.peer}),
                        headers=[("forwarded", f"for={src_ip}")],
                    )  # fmt: skip
        except DialRefused as exc:
            log.info("outbound %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            if admitted is not None:
                admitted.acct.refused("error", exc.flag)
            acct.refused("error", exc.flag)
            return
        except (HboneError, OSError) as exc:
            status = exc.status if isinstance(exc, HboneError) else 0
            denied = status in (401, 403)
            log.info("outbound %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            if admitted is not None:
                admitted.acct.refused("error", "UF")  # a no-op after its own denial
            acct.refused(
                "deny" if denied else "error", "DENY" if denied else "UF",
                reason="no route" if r.kind == "refuse" else None,
            )  # fmt: skip
            return
        except asyncio.CancelledError:
            ep.abort()
            if admitted is not None:
                admitted.acct.refused("error", "DC")
            acct.refused("error", "DC")
            raise
        # Same node, plaintext both ways (a passthrough, or a local delivery): the kernel may
        # carry the bytes (decided above).
        fast = node.fastpath
        if (
            fast is not None
            and isinstance(upstream, TcpEndpoint)
            and (r.kind == "passthrough" or admitted is not None)
            and r.dst_pod is not None
            and r.dst_pod.node == node.name
        ):
            joined = fast.splice(ep, upstream, acct)
        else:
            joined = splice(ep, upstream, acct)
        if admitted is not None:
            joined = self._as_inbound(joined, admitted, src_ip, r, ep, upstream)
        if self.live is None or self.pod_key is None:
            await joined
            return

        def close() -> None:
            ep.abort()
            upstream.abort()

        token = self.live.add(self.pod_key, dst_ip, dst_port, r, close)
        try:
            await joined
        finally:
            self.live.discard(token)

    async def _as_inbound(
        self,
        joined: Coroutine[object, object, None],
        admitted: LocalAdmission,
        src_ip: str,
        r: Route,
        ep: Endpoint,
        upstream: Endpoint,
    ) -> None:
        """The splice, seen also as the inbound side would see it: registered for ingress
        re-decisions on policy change (`Node.revalidate_inbound`), and recorded."""
        admitted.acct.connected()
        live = LiveInbound(
            src_ip, r.ip, r.port, True, admitted.via_waypoint, ep, upstream,
            admitted.principal, admitted.src_namespace,
        )  # fmt: skip
        try:
            with self.node.serving_inbound(live):
                await joined
        finally:
            admitted.acct.finished(ep)
