"""`meshctl analyze`: configuration that parses but will not do what its author meant.

`config validate` answers "will a proxy accept these files?"; this answers "will they work?",
as `istioctl analyze` does. Each finding is one line with a stable code, so scripts and CI can
grep for a code and an operator can search for it. Analysis is a pure function of a snapshot
(`analyze`), so the same checks can later run against the API server's objects.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from mesh.config.model import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    GATEWAY_NAME_LABEL,
    USE_WAYPOINT_LABEL,
    AuthorizationPolicy,
    BackendRef,
    CiliumNetworkPolicy,
    Pod,
    PolicyTargetRef,
)
from mesh.config.parse import ConfigErrors, load_snapshot
from mesh.config.snapshot import Snapshot, selector_matches

ISTIO_INJECTION_LABEL = "istio-injection"

# Codes are stable: scripts match on them. Never renumber; retire a code instead.
MIXED_DATAPLANE = "AM0001"
POLICY_SELECTS_NOTHING = "AM0002"
L7_WITHOUT_WAYPOINT = "AM0003"
ROUTE_TO_MISSING_SERVICE = "AM0004"


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    obj: str  # "Kind namespace/name", as config errors name objects
    message: str

    def __str__(self) -> str:
        return f"Warning [{self.code}] ({self.obj}) {self.message}"


def _workloads(snap: Snapshot, namespace: str) -> list[Pod]:
    """Application pods of a namespace: waypoint pods are the mesh's, no user policy's target."""
    return [p for p in snap.pods if p.namespace == namespace and GATEWAY_NAME_LABEL not in p.labels]


def _mixed_labels(snap: Snapshot) -> list[Finding]:
    out = []
    for ns in snap.namespaces:
        if (
            ns.labels.get(ISTIO_INJECTION_LABEL) == "enabled"
            and ns.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT
        ):
            out.append(
                Finding(
                    MIXED_DATAPLANE,
                    f"Namespace {ns.name}",
                    f"is labelled both {ISTIO_INJECTION_LABEL}=enabled and "
                    f"{DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}: pods would get a sidecar "
                    "and ztunnel redirection at once; choose one data plane",
                )
            )
    return out


def _authz_selects_nothing(snap: Snapshot, pol: AuthorizationPolicy) -> bool:
    if pol.target_refs:  # bound to a waypoint or service, not to pods
        return False
    pods = snap.pods if pol.namespace == snap.root_namespace else _workloads(snap, pol.namespace)
    return not any(
        selector_matches(pol.selector, p.labels) for p in pods if GATEWAY_NAME_LABEL not in p.labels
    )


def _empty_policies(snap: Snapshot) -> list[Finding]:
    out = []
    for ap in snap.authorization_policies:
        if _authz_selects_nothing(snap, ap):
            out.append(
                Finding(
                    POLICY_SELECTS_NOTHING,
                    f"AuthorizationPolicy {ap.key}",
                    "selects no pods: it has no effect",
                )
            )
    for np in snap.network_policies:
        if not any(
            selector_matches(np.pod_selector, p.labels) for p in _workloads(snap, np.namespace)
        ):
            out.append(
                Finding(
                    POLICY_SELECTS_NOTHING,
                    f"NetworkPolicy {np.key}",
                    "spec.podSelector selects no pods: it has no effect",
                )
            )
    for cnp in snap.cilium_policies:
        if not _cnp_pods(snap, cnp):
            out.append(
                Finding(
                    POLICY_SELECTS_NOTHING,
                    f"CiliumNetworkPolicy {cnp.key}",
                    "spec.endpointSelector selects no pods: it has no effect",
                )
            )
    return out


def _cnp_pods(snap: Snapshot, cnp: CiliumNetworkPolicy) -> list[Pod]:
    return [
        p
        for p in _workloads(snap, cnp.namespace)
        if selector_matches(cnp.endpoint_selector, p.labels)
    ]


def _pod_has_waypoint(snap: Snapshot, pod: Pod) -> bool:
    """Behind a waypoint: enrolled in ambient (else no ztunnel sends its traffic anywhere),
    and its namespace names an existing waypoint, or a service selecting it does."""
    if not snap.is_ambient(pod):
        return False
    for svc in snap.services:
        if (
            svc.namespace == pod.namespace
            and svc.selector
            and selector_matches(svc.selector, pod.labels)
            and snap.waypoint_for_service(svc) is not None
        ):
            return True
    ns = snap.namespace(pod.namespace)
    name = ns.labels.get(USE_WAYPOINT_LABEL) if ns else None
    return bool(name) and name != "none" and snap.waypoint(pod.namespace, str(name)) is not None


def _l7_without_waypoint(snap: Snapshot) -> list[Finding]:
    out = []
    for cnp in snap.cilium_policies:
        if not cnp.has_l7:
            continue
        pods = _cnp_pods(snap, cnp)
        bare = [p.name for p in pods if not _pod_has_waypoint(snap, p)]
        if bare:
            out.append(
                Finding(
                    L7_WITHOUT_WAYPOINT,
                    f"CiliumNetworkPolicy {cnp.key}",
                    "has toPorts.rules.http but no waypoint serves "
                    f"{', '.join(sorted(bare))}: the L7 rule cannot be enforced "
                    f"(enrol the pods in ambient and label namespace {cnp.namespace} with "
                    f"{USE_WAYPOINT_LABEL})",
                )
            )
        if any(r.has_l7 for r in cnp.egress or ()):
            out.append(
                Finding(
                    L7_WITHOUT_WAYPOINT,
                    f"CiliumNetworkPolicy {cnp.key}",
                    "has egress toPorts.rules.http: waypoints check HTTP rules on ingress "
                    "only, so these are not enforced; write them as ingress rules of the "
                    "destination",
                )
            )
    for ap in snap.authorization_policies:
        if not any(r.has_l7 for r in ap.rules):
            continue
        if not ap.target_refs:
            out.append(
                Finding(
                    L7_WITHOUT_WAYPOINT,
                    f"AuthorizationPolicy {ap.key}",
                    "has L7 fields (methods, paths, hosts, requestPrincipals, request `when` "
                    "keys) but selects pods, where only ztunnel (L4) sees the traffic: ALLOW "
                    "rules with them never match and DENY rules are judged on their L4 parts "
                    "alone; bind it to a waypoint with targetRefs",
                )
            )
            continue
        out.extend(
            _refs_without_waypoint(
                snap, f"AuthorizationPolicy {ap.key}", ap.namespace, ap.target_refs
            )
        )
    for ra in snap.request_authentications:
        if not ra.target_refs:
            out.append(
                Finding(
                    L7_WITHOUT_WAYPOINT,
                    f"RequestAuthentication {ra.key}",
                    "selects pods, where only ztunnel (L4) sees the traffic: no JWT is checked; "
                    "bind it to a waypoint with targetRefs",
                )
            )
            continue
        out.extend(
            _refs_without_waypoint(
                snap, f"RequestAuthentication {ra.key}", ra.namespace, ra.target_refs
            )
        )
    return out


def _refs_without_waypoint(
    snap: Snapshot, obj: str, namespace: str, refs: tuple[PolicyTargetRef, ...]
) -> list[Finding]:
    out = []
    for ref in refs:
        missing = False
        if ref.kind == "Gateway":
            missing = snap.waypoint(namespace, ref.name) is None
        elif ref.kind == "Service":
            svc = snap.service(namespace, ref.name)
            missing = svc is None or snap.waypoint_for_service(svc) is None
        elif ref.kind == "GatewayClass":
            missing = not snap.waypoints
        if missing:
            out.append(
                Finding(
                    L7_WITHOUT_WAYPOINT,
                    obj,
                    f"targets {ref.kind} {ref.name}, which has no waypoint: "
                    "its L7 rules are enforced nowhere",
                )
            )
    return out


def _missing_services(snap: Snapshot) -> list[Finding]:
    out = []
    for route in snap.http_routes:
        obj = f"{route.kind} {route.key}"
        seen: set[str] = set()
        for pref in route.parent_refs:
            if pref.kind == "Service" and snap.service(pref.namespace, pref.name) is None:
                key = f"{pref.namespace}/{pref.name}"
                if key not in seen:
                    seen.add(key)
                    out.append(
                        Finding(
                            ROUTE_TO_MISSING_SERVICE, obj, f"parentRef Service {key} does not exist"
                        )
                    )
        refs: list[BackendRef] = []
        for rule in route.rules:
            refs.extend(rule.backend_refs)
            for f in rule.filters:
                if f.request_mirror is not None:
                    refs.append(f.request_mirror.backend)
        for b in refs:
            key = f"{b.namespace}/{b.name}"
            if key not in seen and snap.service(b.namespace, b.name) is None:
                seen.add(key)
                out.append(
                    Finding(
                        ROUTE_TO_MISSING_SERVICE, obj, f"backendRef Service {key} does not exist"
                    )
                )
    return out


def analyze(snap: Snapshot) -> list[Finding]:
    """Every finding, in a stable order (by check, then as the snapshot sorts objects)."""
    return [
        *_mixed_labels(snap),
        *_empty_policies(snap),
        *_l7_without_waypoint(snap),
        *_missing_services(snap),
    ]


def _analyze(args: argparse.Namespace) -> int:
    try:
        snap = load_snapshot(
            args.paths, trust_domain=args.trust_domain, root_namespace=args.root_namespace
        )
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"Error ({err})")
        return 2
    findings = analyze(snap)
    for f in findings:
        print(f)
    if not findings:
        print("ok: no findings")
        return 0
    return 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="warn about configuration that is valid but will not work as meant",
        description="Read the same manifests as `config validate` and print one line per "
        "finding: Warning [CODE] (Kind namespace/name) message. Codes: "
        f"{MIXED_DATAPLANE} namespace labelled for sidecars and ambient; "
        f"{POLICY_SELECTS_NOTHING} policy selecting no pods; "
        f"{L7_WITHOUT_WAYPOINT} L7 rule with no waypoint to enforce it; "
        f"{ROUTE_TO_MISSING_SERVICE} route to a missing service. "
        "Exit status: 0 no findings, 1 warnings found, 2 the manifests do not parse.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE")
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE)
    p.set_defaults(func=_analyze)
