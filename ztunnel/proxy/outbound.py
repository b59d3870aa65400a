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
import logging
import random
from dataclasses import dataclass

from mesh.config.model import Pod, Service
from mesh.config.snapshot import Snapshot
from mesh.hbone import HboneError
from mesh.hbone.nexthop import next_hop
from mesh.metrics import ConnectionLabels
from mesh.ports import HBONE_PORT
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting
from ztunnel.proxy.node import DialRefused, Redirected, splice

log = logging.getLogger("ztunnel.outbound")

__all__ = ["Outbound", "Route", "route_outbound"]


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
            return Route("hbone", ip, port, (w.ip, wp.port), snap.identity(w), svc, w)
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


def _peer_port(ep: TcpEndpoint) -> int | None:
    """The app's own source port (the redirected socket's peer), for the flow record."""
    t = ep.transport
    peer = t.get_extra_info("peername") if t is not None else None
    return int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None


class Outbound(Redirected):
    """The outbound role. Node-level listener: the source pod is found by the connection's
    source address. In-pod listener (`pod_key`): the source is that pod, whatever address the
    redirected socket shows (BPF connects come from 127.0.0.1)."""

    role = "outbound"

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
        try:
            if r.kind == "refuse":
                raise HboneError(503, r.reason)
            if r.kind == "passthrough":
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
            acct.refused("error", exc.flag)
            return
        except (HboneError, OSError) as exc:
            status = exc.status if isinstance(exc, HboneError) else 0
            denied = status in (401, 403)
            log.info("outbound %s -> %s:%s refused: %s", src_ip, dst_ip, dst_port, exc)
            ep.abort()
            acct.refused(
                "deny" if denied else "error", "DENY" if denied else "UF",
                reason="no route" if r.kind == "refuse" else None,
            )  # fmt: skip
            return
        except asyncio.CancelledError:
            ep.abort()
            acct.refused("error", "DC")
            raise
        await splice(ep, upstream, acct)
