"""Service VIPs for pods that are not in the mesh, the way kube-proxy's iptables mode does it.

Enrolled pods never need these rules (their connects are rewritten to ztunnel in the pod's own
netns before a packet exists); every other pod's packets to a VIP reach its node (default route
via the node bridge) and are DNATed there to one endpoint, chosen at random with the statistic
module. The node's nat table is ours alone, so each update replaces it whole and atomically
with iptables-restore: no stale chains after an endpoint change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.config.snapshot import Snapshot
from mesh.ports import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT


@dataclass(frozen=True, slots=True)
class ServiceRule:
    name: str  # namespace/name:port, for comments
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]  # (pod ip, target port)


def service_rules(snap: Snapshot) -> list[ServiceRule]:
    out: list[ServiceRule] = []
    for svc in snap.services:
        if not svc.cluster_ip:
            continue
        for sp in svc.ports:
            if sp.protocol != "TCP":
                continue
            eps = tuple((ep.pod.ip, ep.port) for ep in snap.endpoints(svc, sp.port) if ep.pod.ip)
            out.append(ServiceRule(f"{svc.key}:{sp.port}", svc.cluster_ip, sp.port, eps))
    return out


def _chain(prefix: str, *parts: object) -> str:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12].upper()
    return f"{prefix}{h}"


@dataclass(frozen=True, slots=True)
class NodeCapture:
    """Node-level capture for the enrolled pods of one node (the lab's `node` capture mode,
    used when ztunnel cannot open listeners inside pods): their outbound TCP goes to the
    node's ztunnel :15001, and plaintext arriving for them to its :15006. ztunnel's own
    connections start in the node (OUTPUT), never in PREROUTING, so they are never captured."""

    sources: tuple[str, ...]  # enrolled pod IPs on this node
    destinations: tuple[str, ...]  # the same pods, as destinations of inbound plaintext
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PLAINTEXT_PORT
    hbone_port: int = HBONE_PORT


def _capture_lines(cap: NodeCapture) -> list[str]:
    out = []
    for ip in cap.sources:
        out.append(
            f'-A AM-CAPTURE -s {ip}/32 -p tcp -m comment --comment "ambientmesh outbound" '
            f"-j REDIRECT --to-ports {cap.outbound_port}"
        )
    for ip in cap.destinations:
        out.append(
            f"-A AM-CAPTURE -d {ip}/32 -p tcp -m tcp ! --dport {cap.hbone_port} "
            f'-m comment --comment "ambientmesh inbound plaintext" '
            f"-j REDIRECT --to-ports {cap.inbound_port}"
        )
    return out


def nat_table(
    rules: Iterable[ServiceRule], local_pod_cidr: str, capture: NodeCapture | None = None
) -> str:
    """The node's whole nat table in iptables-restore format. Capture comes before the
    service rules: an enrolled pod's connect to a VIP must reach ztunnel with the VIP as its
    original destination, not an endpoint kube-proxy already picked."""
    chains = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    chains += [":POSTROUTING ACCEPT [0:0]", ":AM-CAPTURE - [0:0]", ":AM-SERVICES - [0:0]"]
    body = [
        '-A PREROUTING -m comment --comment "ambientmesh lab capture" -j AM-CAPTURE',
        '-A PREROUTING -m comment --comment "ambientmesh lab services" -j AM-SERVICES',
        '-A OUTPUT -m comment --comment "ambientmesh lab services" -j AM-SERVICES',
        # hairpin: a pod reaching a VIP that lands on its own bridge would get the reply
        # straight from the endpoint (L2, never un-DNATed); masquerade makes it come back here
        f"-A POSTROUTING -s {local_pod_cidr} -d {local_pod_cidr} -m conntrack --ctstate DNAT "
        '-m comment --comment "ambientmesh lab hairpin" -j MASQUERADE',
    ]
    if capture is not None:
        body += _capture_lines(capture)
    for r in rules:
        if not r.endpoints:
            continue
        svc = _chain("AM-SVC-", r.vip, r.port)
        chains.append(f":{svc} - [0:0]")
        body.append(
            f"-A AM-SERVICES -d {r.vip}/32 -p tcp -m tcp --dport {r.port} "
            f'-m comment --comment "{r.name}" -j {svc}'
        )
        n = len(r.endpoints)
        for i, (ip, port) in enumerate(r.endpoints):
            sep = _chain("AM-SEP-", r.vip, r.port, ip, port)
            chains.append(f":{sep} - [0:0]")
            left = n - i
            pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            body.append(f"-A {svc} {pick}-j {sep}")
            body.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}")
    return "*nat\n" + "\n".join(chains + body) + "\nCOMMIT\n"
