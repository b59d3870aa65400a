"""Inbound HBONE (:15008): the caller is already verified by TLS; authorize, then deliver.

Answers follow Istio's ztunnel, so callers (and Envoy) see familiar codes: 400 for a request
that is not a CONNECT to a workload on this node, 401 when AuthorizationPolicy denies, 403 when a
NetworkPolicy or CiliumNetworkPolicy does (decided before any dial to the application), 503
when the application refused or cannot be reached, 504 when connecting to it timed out.

A waypoint calling on behalf of someone: the peer is then the waypoint, and policy would only
see the waypoint's identity. When (and only when) the peer's identity is a pod of the
waypoint that serves the destination, the original caller's SPIFFE ID is taken from the
`x-ambientmesh-source-principal` request header (`SOURCE_PRINCIPAL_HEADER`). From any other
peer the header is ignored: a workload cannot claim to be someone else.

The caller's address follows the same rule. A waypoint's `Forwarded: for=` is believed. Anyone
else's is believed only when it adds nothing the connection does not already prove: the
claimed address is a pod running as the peer's own identity, and the connection comes from
that pod's address or from its node's (the node's ztunnel dials on the pod's behalf). Any
other claim is ignored (logged): access log and `ipBlocks` see the real peer address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from mesh.authz import AuthzRequest, authorize
from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot, selector_matches
from mesh.hbone import ConnectRequest
from mesh.hbone.connection import SOURCE_PRINCIPAL_HEADER
from mesh.hbone.forwarded import forwarded_for
from mesh.identity.spiffe import SpiffeId
from mesh.metrics import ConnectionLabels
from mesh.netns import NetNs
from mesh.telemetry import Accounting
from ztunnel.proxy.node import DialRefused, LiveInbound, Node, splice

log = logging.getLogger("ztunnel.inbound")

__all__ = ["SOURCE_PRINCIPAL_HEADER", "InboundHbone", "waypoint_identities_for"]


def waypoint_identities_for(snap: Snapshot, pod: Pod) -> frozenset[str]:
    """Identities of the waypoint pods serving any service that selects `pod`."""
    ids: set[str] = set()
    for svc in snap.services:
        if svc.namespace != pod.namespace or not svc.selector:
            continue
        if not selector_matches(svc.selector, pod.labels):
            continue
        wp = snap.waypoint_for_service(svc)
        if wp is not None:
            ids.update(snap.identity(p) for p in snap.waypoint_pods(wp))
    return frozenset(ids)


class InboundHbone:
    """The CONNECT handler. Node-level (`pod_key=None`): any pod scheduled on this node;
    in-pod (the :15008 listener inside one pod's netns): that pod only."""

    def __init__(self, node: Node, *, pod_key: str | None = None, netns: NetNs | None = None):
        self.node = node
        self.pod_key = pod_key
        self.netns = netns

    @staticmethod
    def _own_address(snap: Snapshot, identity: str, claimed: str, peer_ip: str) -> bool:
        """A non-waypoint peer may name its own pod's address, if the connection comes from
        that pod or from that pod's node (never another identity's pod, never from afar)."""
        src = snap.pod_by_ip(claimed)
        if src is None or snap.identity(src) != identity:
            return False
        node = snap.node(src.node) if src.node else None
        return peer_ip == claimed or (node is not None and node.address == peer_ip)

    async def __call__(self, req: ConnectRequest) -> None:
        node = self.node
        snap = node.snapshot()
        host, _, port_s = req.authority.rpartition(":")
        try:
            port = int(port_s)
            ipaddress.IPv4Address(host)
            if not 0 < port < 65536:
                raise ValueError(port_s)
        except ValueError:
            log.info("inbound from %s: bad authority %r", req.peer_identity, req.authority)
            req.reject(400, f"bad authority {req.authority!r}: expected ip:port")
            return
        pod = snap.pod_by_ip(host)
        if pod is None:
            req.reject(400, f"{host} is not a known workload")
            return
        if self.pod_key is not None and pod.key != self.pod_key:
            req.reject(400, f"{host} is not {self.pod_key}, the pod this listener serves")
            return
        if self.pod_key is None and pod.node != node.name:
            req.reject(400, f"{host} ({pod.key}) is not on node {node.name}")
            return

        principal = req.peer_identity
        claimed = req.headers.get(SOURCE_PRINCIPAL_HEADER)
        vouches = req.peer_identity in waypoint_identities_for(snap, pod)
        if claimed and vouches:
            principal = claimed  # the waypoint vouches for its caller
        try:
            src_ns: str | None = SpiffeId.parse(principal).namespace
        except ValueError:
            req.reject(400, f"{SOURCE_PRINCIPAL_HEADER} {claimed!r} is not a SPIFFE ID")
            return
        peer_ip = req.peer_address[0] if req.peer_address else ""
        src_ip = peer_ip
        fwd = forwarded_for(req.headers.get("forwarded", ""))
        if fwd and fwd != peer_ip:
            if vouches or self._own_address(snap, req.peer_identity, fwd, peer_ip):
                src_ip = fwd
            else:
                node.metrics.refused("forwarded_ignored")
                log.info("inbound from %s (%s): ignoring Forwarded for=%s: not its to claim",
                         peer_ip, req.peer_identity, fwd)  # fmt: skip
        # NetworkPolicy/CNP first (a dict lookup for pods no policy isolates), then
        # AuthorizationPolicy: the connection goes through only when both allow it.
        netpol = node.ingress_denied(
            snap, src_ip, host, port, authenticated=True, via_waypoint=vouches
        )
        decision = authorize(
            snap.policies_for(pod), AuthzRequest(principal, src_ns, src_ip, port), l7=False
        )
        allowed = netpol is None and decision.allowed
        acct = Accounting(
            node.metrics,
            ConnectionLabels.build(
                reporter="destination",
                source=snap.pod_by_ip(src_ip),
                source_principal=principal,
                destination=pod,
                mtls=True,
                response_flags="-" if allowed else "DENY",
                trust_domain=snap.trust_domain,
            ),
            reporter="destination",
            src=src_ip,
            dst=req.authority,
            src_identity=principal,
            dst_identity=snap.identity(pod),
            service=None,
            mtls=True,
            policy=netpol.policy if netpol is not None else decision.policy,
            flows=node.flows, source=snap.pod_by_ip(src_ip), destination=pod,
        )  # fmt: skip
        if netpol is not None:
            log.info("inbound %s (%s) -> %s denied by %s: %s",
                     principal, src_ip, req.authority, netpol.policy, netpol.reason)  # fmt: skip
            req.reject(403, f"denied by {netpol.policy}")
            acct.refused("deny", "DENY")
            return
        if not decision.allowed:
            log.info("inbound %s -> %s denied: %s", principal, req.authority, decision.reason)
            req.reject(401, f"denied: {decision.reason}")
            acct.refused("deny", "DENY")
            return
        netns = self.netns if self.netns is not None else node.netns_of(pod.key)
        try:
            app = await node.connect_tcp(host, port, netns)
        except DialRefused as exc:
            req.reject(exc.status, str(exc))
            acct.refused("error", exc.flag)
            return
        except TimeoutError:
            req.reject(504, f"{req.authority}: connect timed out")
            acct.refused("error", "UF")
            return
        except OSError as exc:
            req.reject(503, f"{req.authority}: {exc.strerror or exc}")
            acct.refused("error", "UF")
            return
        except asyncio.CancelledError:
            acct.refused("error", "DC")
            raise
        down = req.accept()
        live = LiveInbound(src_ip, host, port, True, vouches, down, app, principal, src_ns)
        with node.serving_inbound(live):
            await splice(down, app, acct)
