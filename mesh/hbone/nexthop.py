"""Where an HBONE CONNECT to a workload goes, and who must answer there.

ztunnel's outbound and the waypoint's upstream dial the same way: at the destination node's
ztunnel when the node has an address, else at the pod's own HBONE listener. One function, so
the two proxies cannot drift apart on it.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot
from mesh.identity.spiffe import node_id
from mesh.ports import HBONE_PORT


def next_hop(
    snap: Snapshot,
    pod: Pod | None,
    ip: str,
    *,
    node: str | None,
    hbone_port: int = HBONE_PORT,
    node_ports: Mapping[str, int] | None = None,
) -> tuple[tuple[str, int], str] | None:
    """The HBONE address for the workload at `ip` (on `node`) and the identity that must
    answer there: the node's ztunnel (`node_ports` may override its port), else the pod
    itself. None when neither the node has an address nor the pod is known."""
    dst_node = snap.node(node) if node else None
    if dst_node is not None and dst_node.address:
        port = node_ports.get(dst_node.name, hbone_port) if node_ports else hbone_port
        return (dst_node.address, port), node_id(snap.trust_domain, dst_node.name)
    if pod is None:
        return None
    return (ip, hbone_port), snap.identity(pod)
