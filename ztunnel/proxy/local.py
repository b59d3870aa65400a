"""Local delivery: a meshed connection between two pods on this node, without HBONE.

Over HBONE, such a connection would leave ztunnel's outbound side with mTLS and h2 framing
and arrive at ztunnel's own inbound side, which undoes both: two TLS sessions per byte, in
user space, for bytes that never leave the node. Here the outbound side instead makes every
decision the inbound side would make for that CONNECT, from the source pod's identity, and
dials the destination itself, the way the inbound side does:

- the caller's identity is the source pod's SPIFFE ID, known first-hand (ztunnel accepted the
  connection inside that pod's netns, or by its address), so the connection counts as mTLS:
  PeerAuthentication STRICT, NetworkPolicy/CNP rules for authenticated peers and
  AuthorizationPolicy principals/namespaces see what they would see over HBONE;
- the caller's address is the source pod's IP (what the HBONE path's `Forwarded: for=`
  carries and the inbound side believes from the pod's own node);
- NetworkPolicy/CNP (`Node.ingress_denied`) first, then AuthorizationPolicy, as inbound does;
- the dial goes from inside the destination pod's netns (`Node.netns_of`), as inbound's does;
- the destination-side record (reporter destination, mTLS, identities, the policy that
  denied) is written beside the source-side one, so both views of the connection stay.

Istio's ztunnel had the same shortcut ("DirectLocal", in its shared-proxy mode): a same-node
HBONE destination's stream went straight to its inbound handler after the RBAC check, with both
the source and the destination metrics. It was dropped with the in-pod mode, where every pod
has its own listeners and the bytes go over HBONE even on one node. We keep it because here the
price of that TLS is Python's, per byte, twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.authz import AuthzRequest, authorize
from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot
from mesh.identity.spiffe import SpiffeId
from mesh.metrics import ConnectionLabels
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting
from ztunnel.proxy.inbound import waypoint_identities_for
from ztunnel.proxy.node import Node

__all__ = ["LocalAdmission", "admit_local", "dial_local"]


@dataclass(frozen=True, slots=True)
class LocalAdmission:
    """The inbound side's verdict on a local delivery, and its record (`acct`)."""

    acct: Accounting
    status: int  # 0: allowed; else the HBONE answer inbound would give (401 authz, 403 netpol)
    reason: str
    via_waypoint: bool
    principal: str  # what AuthorizationPolicy decided on, again at each policy change
    src_namespace: str | None


def admit_local(
    node: Node, snap: Snapshot, src: Pod, src_ip: str, dst: Pod, dst_ip: str, port: int
) -> LocalAdmission:
    """What `InboundHbone` would decide for a CONNECT from `src`'s identity to `dst_ip:port`.

    `via_waypoint` is what inbound computes from the peer's identity: true only when the
    source runs as one of the destination's waypoints' identities (a waypoint's pods are not
    captured, so in practice never; kept for parity)."""
    principal = snap.identity(src)
    try:
        src_ns: str | None = SpiffeId.parse(principal).namespace
    except ValueError:
        src_ns = src.namespace
    vouches = principal in waypoint_identities_for(snap, dst)
    netpol = node.ingress_denied(
        snap, src_ip, dst_ip, port, authenticated=True, via_waypoint=vouches
    )
    decision = authorize(
        snap.policies_for(dst), AuthzRequest(principal, src_ns, src_ip, port), l7=False
    )
    allowed = netpol is None and decision.allowed
    acct = Accounting(
        node.metrics,
        ConnectionLabels.build(
            reporter="destination",
            source=src,
            source_principal=principal,
            destination=dst,
            mtls=True,
            response_flags="-" if allowed else "DENY",
            trust_domain=snap.trust_domain,
        ),
        reporter="destination",
        src=src_ip,
        dst=f"{dst_ip}:{port}",
        src_identity=principal,
        dst_identity=snap.identity(dst),
        service=None,
        mtls=True,
        policy=netpol.policy if netpol is not None else decision.policy,
        flows=node.flows, source=src, destination=dst,
    )  # fmt: skip
    if netpol is not None:
        why = f"denied by {netpol.policy}: {netpol.reason}"
        return LocalAdmission(acct, 403, why, vouches, principal, src_ns)
    if not decision.allowed:
        return LocalAdmission(acct, 401, f"denied: {decision.reason}", vouches, principal, src_ns)
    return LocalAdmission(acct, 0, "", vouches, principal, src_ns)


async def dial_local(node: Node, dst: Pod, dst_ip: str, port: int) -> TcpEndpoint:
    """The destination pod's app, dialled as inbound dials it: from inside its netns."""
    return await node.connect_tcp(dst_ip, port, node.netns_of(dst.key))
