"""The ingress half of NetworkPolicy/CiliumNetworkPolicy as ztunnel consults it per connection.

`mesh.netpolicy.decide` scans every policy; ztunnel's inbound paths run before every upstream
dial, so they ask this table instead (DESIGN.md §7: a precomputed lookup per snapshot). Built
lazily the first time a connection sees a new snapshot:

* the destination addresses that some policy isolates for ingress. Most pods in most clusters
  are not isolated: for them the answer is one dict miss and no decision object at all;
* for isolated destinations, a memo of `decide()`'s answers keyed by the connection's L3/L4
  facts. It is bounded: a peer spraying source addresses can make it recompute, never grow
  without limit.

The decision itself stays `decide()`'s, so ztunnel and the kernel's egress maps (filled from the
same function) cannot disagree about what a policy means.
"""

from __future__ import annotations

from mesh.config.snapshot import Snapshot, selector_matches
from mesh.netpolicy import Decision, Direction, decide

__all__ = ["MEMO_LIMIT", "EgressIsolation", "IngressPolicy", "isolated_pods"]

MEMO_LIMIT = 16384


def isolated_pods(snap: Snapshot, direction: Direction) -> frozenset[str]:
    """IPs of the pods some policy selects for `direction` (the only ones a policy can deny
    that way)."""
    np_type = "Ingress" if direction is Direction.INGRESS else "Egress"
    out: set[str] = set()
    for pod in snap.pods:
        if not pod.ip:
            continue
        for np in snap.network_policies:
            if (
                np.namespace == pod.namespace
                and np_type in np.policy_types
                and selector_matches(np.pod_selector, pod.labels)
            ):
                out.add(pod.ip)
                break
        else:
            for cnp in snap.cilium_policies:
                rules = cnp.ingress if direction is Direction.INGRESS else cnp.egress
                if (
                    rules is not None
                    and cnp.namespace == pod.namespace
                    and selector_matches(cnp.endpoint_selector, pod.labels)
                ):
                    out.add(pod.ip)
                    break
    return frozenset(out)


def isolated_for_ingress(snap: Snapshot) -> frozenset[str]:
    """IPs of the pods some policy selects for ingress."""
    return isolated_pods(snap, Direction.INGRESS)


class EgressIsolation:
    """The source pods some policy isolates for egress, per snapshot. ztunnel's node-level
    outbound listener (netfilter capture) has no connect() hook in front of it, so it decides
    egress itself, but only for these pods: for every other source it is one set miss."""

    __slots__ = ("_isolated", "_snap")

    def __init__(self) -> None:
        self._snap: Snapshot | None = None
        self._isolated: frozenset[str] = frozenset()

    def isolated(self, snap: Snapshot, src_ip: str) -> bool:
        if snap is not self._snap:
            self._isolated = isolated_pods(snap, Direction.EGRESS)
            self._snap = snap
        return src_ip in self._isolated


class IngressPolicy:
    """One per proxy: the table of its current snapshot, rebuilt when the snapshot changes
    (snapshots are swapped whole, so identity is the version check)."""

    __slots__ = ("_isolated", "_memo", "_snap", "memo_limit")

    def __init__(self, memo_limit: int = MEMO_LIMIT) -> None:
        self._snap: Snapshot | None = None
        self._isolated: frozenset[str] = frozenset()
        self._memo: dict[tuple[str, str, int, bool], Decision] = {}
        self.memo_limit = memo_limit

    def check(
        self, snap: Snapshot, src_ip: str, dst_ip: str, dst_port: int, *, authenticated: bool
    ) -> Decision | None:
        """None when no policy isolates the destination (the connection is theirs to allow
        or deny no further); otherwise `decide()`'s answer for this connection."""
        if snap is not self._snap:
            self._isolated = isolated_for_ingress(snap)
            self._memo = {}
            self._snap = snap
        if dst_ip not in self._isolated:
            return None
        key = (src_ip, dst_ip, dst_port, authenticated)
        hit = self._memo.get(key)
        if hit is None:
            hit = decide(
                snap, src_ip, dst_ip, dst_port, Direction.INGRESS, authenticated=authenticated
            )
            if len(self._memo) >= self.memo_limit:
                self._memo.clear()
            self._memo[key] = hit
        return hit
