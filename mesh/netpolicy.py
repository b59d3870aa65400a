"""NetworkPolicy and CiliumNetworkPolicy decisions: may this pod connect there, or accept that?

Sans-IO and pure, like `mesh.authz`: a snapshot and a connection's L3/L4 facts in, a decision
naming the deciding policy out. ztunnel (ingress, before the upstream dial) and the map filler
for the cgroup connect() program (egress) are meant to share this one function, so the kernel
and the proxy can never disagree about what a policy means. The waypoint asks
`waypoint_http_rules` for the HTTP rules left over by an ALLOW_L7 verdict.

Semantics (Kubernetes' and Cilium's, which agree here): policies only allow. A pod is isolated
in a direction when some policy selecting it covers that direction (a NetworkPolicy listing it
in policyTypes, a CiliumNetworkPolicy with that section present); an isolated pod's traffic
that way is allowed only if some rule of some selecting policy of either kind allows it, and
denied otherwise. A pod no policy isolates is open.

Decisions are on pod IPs, after the service VIP has been resolved to an endpoint: Kubernetes
applies NetworkPolicy after DNAT, and so must the caller.

Rules with `toPorts.rules.http` cannot be decided at L4. When only such rules allow a
connection the verdict is `ALLOW_L7`: admit it, and let the namespace's waypoint check each
request. An L4-only rule allowing the same connection wins (it admits every request anyway).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass

from mesh.config.model import (
    CiliumEntity,
    CiliumNetworkPolicy,
    CiliumRule,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyRule,
    Pod,
    Service,
)
from mesh.config.snapshot import Snapshot, selector_matches


class Direction(enum.Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Verdict(enum.Enum):
    ALLOW = "allow"
    ALLOW_L7 = "allow-l7"  # admitted at L4; HTTP rules remain for the waypoint
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    # "Kind namespace/name" of the policy that allowed, or of the first (by kind, then key)
    # that isolates the pod when denied; None when no policy applies.
    policy: str | None
    reason: str

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.DENY


@functools.lru_cache(maxsize=65536)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# Cached: compiling a pod's egress for the kernel (bpf.policy) asks about every prefix of
# every rule, and parsing dominated (30 s for 1,000 rules uncached).
_network = functools.lru_cache(maxsize=65536)(lambda cidr: ipaddress.ip_network(cidr, strict=False))


def _in_cidr(ip: str, cidr: str) -> bool:
    a = _ip(ip)
    net = _network(cidr)
    return a is not None and a.version == net.version and a in net


def _np_peer_matches(
    snap: Snapshot, pol: NetworkPolicy, peer: NetworkPolicyPeer, ip: str, pod: Pod | None
) -> bool:
    if peer.ip_block is not None:
        return _in_cidr(ip, peer.ip_block) and not any(
            _in_cidr(ip, e) for e in peer.ip_block_except
        )
    if pod is None:  # selectors match pods only
        return False
    if peer.namespace_selector is None:
        if pod.namespace != pol.namespace:
            return False
    else:
        ns = snap.namespace(pod.namespace)
        if ns is None or not selector_matches(peer.namespace_selector, ns.labels):
            return False
    return peer.pod_selector is None or selector_matches(peer.pod_selector, pod.labels)


def _np_rule_allows(
    snap: Snapshot, pol: NetworkPolicy, rule: NetworkPolicyRule, ip: str, pod: Pod | None, port: int
) -> bool:
    if rule.ports and not any(p.port is None or p.port == port for p in rule.ports):
        return False
    return not rule.peers or any(_np_peer_matches(snap, pol, p, ip, pod) for p in rule.peers)


def _is_world(snap: Snapshot, ip: str, pod: Pod | None) -> bool:
    """Cilium's `world`: outside the cluster, i.e. not a pod, a node, or a service address."""
    if pod is not None:
        return False
    if any(n.address == ip for n in snap.nodes):
        return False
    return not any(s.cluster_ip == ip for s in snap.services)


def _cnp_rule_verdict(
    snap: Snapshot,
    pol: CiliumNetworkPolicy,
    rule: CiliumRule,
    ip: str,
    pod: Pod | None,
    port: int,
    authenticated: bool,
) -> Verdict | None:
    """ALLOW or ALLOW_L7 when the rule admits the connection, None when it does not."""
    if rule.auth_required and not authenticated:
        return None
    if rule.endpoints or rule.entities or rule.cidrs:
        peer_ok = (
            (
                pod is not None
                and pod.namespace == pol.namespace
                and any(selector_matches(sel, pod.labels) for sel in rule.endpoints)
            )
            or (CiliumEntity.WORLD in rule.entities and _is_world(snap, ip, pod))
            or any(_in_cidr(ip, c) for c in rule.cidrs)
        )
        if not peer_ok:
            return None
    if not rule.to_ports:
        return Verdict.ALLOW
    best: Verdict | None = None
    for pr in rule.to_ports:
        if pr.ports and port not in pr.ports:
            continue
        if not pr.http:
            return Verdict.ALLOW
        best = Verdict.ALLOW_L7
    return best


def _auth_required_by(
    snap: Snapshot, subject: Pod, ingress: bool, peer_ip: str, peer_pod: Pod | None, port: int
) -> str | None:
    """The first CiliumNetworkPolicy selecting `subject` with a rule that requires
    authentication and would admit this peer and port, else None."""
    for cnp in snap.cilium_policies:
        rules = cnp.ingress if ingress else cnp.egress
        if rules is None or cnp.namespace != subject.namespace:
            continue
        if not selector_matches(cnp.endpoint_selector, subject.labels):
            continue
        for rule in rules:
            if (
                rule.auth_required
                and _cnp_rule_verdict(snap, cnp, rule, peer_ip, peer_pod, port, True) is not None
            ):
                return f"CiliumNetworkPolicy {cnp.key}"
    return None


def decide(
    snap: Snapshot,
    source: Pod | str,
    dest_ip: str,
    dest_port: int,
    direction: Direction,
    *,
    authenticated: bool = False,
) -> Decision:
    """The decision for a TCP connection from `source` (a pod, or an address outside the
    snapshot's pods) to dest_ip:dest_port, as seen from the source's side (EGRESS: is the
    source allowed to connect?) or the destination's (INGRESS: may the destination accept?).
    `authenticated` says the peer came over mesh mTLS (Cilium's `authentication: required`)."""
    if isinstance(source, Pod):
        src_pod: Pod | None = source
        src_ip = source.ip or ""
    else:
        src_ip = source
        src_pod = snap.pod_by_ip(source)
    dst_pod = snap.pod_by_ip(dest_ip)
    if direction is Direction.EGRESS:
        subject, peer_ip, peer_pod = src_pod, dest_ip, dst_pod
    else:
        subject, peer_ip, peer_pod = dst_pod, src_ip, src_pod
    if subject is None:
        return Decision(Verdict.ALLOW, None, f"no mesh pod on the {direction.value} side")
    ingress = direction is Direction.INGRESS
    isolating: list[str] = []
    l7_from: str | None = None
    if not authenticated:
        # Cilium merges the rules that select a flow, and an authentication requirement
        # wins: a rule requiring mTLS for this peer and port makes every rule's admission of
        # it conditional on mTLS, including a plain L4 rule of another policy.
        required_by = _auth_required_by(snap, subject, ingress, peer_ip, peer_pod, dest_port)
        if required_by is not None:
            return Decision(
                Verdict.DENY, required_by, "authentication (mesh mTLS) required and absent"
            )
    for np in snap.network_policies:
        if np.namespace != subject.namespace or not selector_matches(
            np.pod_selector, subject.labels
        ):
            continue
        if ("Ingress" if ingress else "Egress") not in np.policy_types:
            continue
        name = f"NetworkPolicy {np.key}"
        isolating.append(name)
        for rule in np.ingress if ingress else np.egress:
            if _np_rule_allows(snap, np, rule, peer_ip, peer_pod, dest_port):
                return Decision(Verdict.ALLOW, name, "allowed by a rule")
    for cnp in snap.cilium_policies:
        rules = cnp.ingress if ingress else cnp.egress
        if rules is None or cnp.namespace != subject.namespace:
            continue
        if not selector_matches(cnp.endpoint_selector, subject.labels):
            continue
        name = f"CiliumNetworkPolicy {cnp.key}"
        isolating.append(name)
        for crule in rules:
            v = _cnp_rule_verdict(snap, cnp, crule, peer_ip, peer_pod, dest_port, authenticated)
            if v is Verdict.ALLOW:
                return Decision(Verdict.ALLOW, name, "allowed by a rule")
            if v is Verdict.ALLOW_L7 and l7_from is None:
                l7_from = name
    if l7_from is not None:
        return Decision(Verdict.ALLOW_L7, l7_from, "allowed at L4; HTTP rules at the waypoint")
    if not isolating:
        return Decision(Verdict.ALLOW, None, f"no policy isolates {subject.key}")
    return Decision(
        Verdict.DENY,
        isolating[0],
        f"{subject.key} is isolated for {direction.value} and no rule allows this",
    )


@dataclass(frozen=True, slots=True)
class HttpRules:
    """The CiliumNetworkPolicy HTTP rules a waypoint enforces for one (source, destination
    pod, port): a request passes when it matches one of them (Cilium merges the L7 rules of
    every rule that admitted the connection). Method and path are anchored regular
    expressions, compiled once; `policy` names the first CNP, for the 403's body."""

    policy: str
    rules: tuple[tuple[re.Pattern[str] | None, re.Pattern[str] | None], ...]

    def allows(self, method: str, path: str) -> bool:
        for m, p in self.rules:
            if (m is None or m.fullmatch(method)) and (p is None or p.fullmatch(path)):
                return True
        return False


def http_rules(
    snap: Snapshot, source: Pod | str, dest_ip: str, dest_port: int, *, authenticated: bool
) -> HttpRules | None:
    """HTTP rules that requests on this connection must match, or None when none apply
    (the connection is allowed, or denied, at L4 alone: `decide` says ALLOW or DENY)."""
    d = decide(snap, source, dest_ip, dest_port, Direction.INGRESS, authenticated=authenticated)
    if d.verdict is not Verdict.ALLOW_L7:
        return None
    dst = snap.pod_by_ip(dest_ip)
    src_pod = source if isinstance(source, Pod) else snap.pod_by_ip(source)
    src_ip = source.ip or "" if isinstance(source, Pod) else source
    assert dst is not None  # ALLOW_L7 comes only from a policy selecting it
    compiled: list[tuple[re.Pattern[str] | None, re.Pattern[str] | None]] = []
    for cnp in snap.cilium_policies:
        if cnp.ingress is None or cnp.namespace != dst.namespace:
            continue
        if not selector_matches(cnp.endpoint_selector, dst.labels):
            continue
        for rule in cnp.ingress:
            v = _cnp_rule_verdict(snap, cnp, rule, src_ip, src_pod, dest_port, authenticated)
            if v is not Verdict.ALLOW_L7:
                continue
            for pr in rule.to_ports:
                if pr.ports and dest_port not in pr.ports:
                    continue
                for h in pr.http:
                    compiled.append(
                        (
                            re.compile(h.method) if h.method else None,
                            re.compile(h.path) if h.path else None,
                        )
                    )
    return HttpRules(d.policy or "", tuple(compiled))


def waypoint_http_rules(
    snap: Snapshot, service: Service, port: int, source_ip: str
) -> tuple[HttpRules, ...]:
    """HTTP rules a waypoint enforces for one caller's requests to `service:port`: one set per
    backend pod whose CiliumNetworkPolicies admit the caller only through L7 rules (the
    caller came over the mesh, so `authentication: required` holds). Computed once per
    downstream connection; a request must satisfy every set, whichever pod it goes to."""
    if not snap.cilium_policies:
        return ()
    out: list[HttpRules] = []
    seen: set[tuple[object, ...]] = set()
    for ep in snap.endpoints(service, port):
        if ep.pod.ip is None:
            continue
        rules = http_rules(snap, source_ip, ep.pod.ip, ep.port, authenticated=True)
        if rules is not None:
            key = (rules.policy, tuple((m and m.pattern, p and p.pattern) for m, p in rules.rules))
            if key not in seen:
                seen.add(key)
                out.append(rules)
    return tuple(out)
