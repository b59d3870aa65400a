"""Authorization evaluation against Istio's semantics, policies written as users write them."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.authz import AuthzRequest, authorize, compile_policy, waypoint_policies
from mesh.config.parse import parse_objects
from mesh.config.snapshot import PolicySet

TD = "spiffe://cluster.local"


def policies(*specs: tuple[str, dict[str, Any]]) -> PolicySet:
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"p{i}-{action.lower()}", "namespace": "shop"},
            "spec": {"action": action, **spec},
        }
        for i, (action, spec) in enumerate(specs)
    ]
    snap = parse_objects(docs)
    pols = snap.authorization_policies
    return PolicySet(
        tuple(p for p in pols if p.action.value == "ALLOW"),
        tuple(p for p in pols if p.action.value == "DENY"),
    )


def req(sa: str | None = "web", ns: str = "shop", port: int = 8080, **l7: str) -> AuthzRequest:
    principal = f"{TD}/ns/{ns}/sa/{sa}" if sa else None
    return AuthzRequest(principal, ns if sa else None, "10.0.1.5", port, **l7)


FROM_WEB = {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}
GET_ONLY = {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}

CASES: list[tuple[str, PolicySet, AuthzRequest, bool, bool]] = [
    ("no policies allow", PolicySet(), req(), False, True),
    ("allow without rules allows nothing", policies(("ALLOW", {})), req(), False, False),
    ("rule {} matches all", policies(("ALLOW", {"rules": [{}]})), req(None), False, True),
    ("principal exact", policies(("ALLOW", {"rules": [FROM_WEB]})), req("web"), False, True),
    ("principal other", policies(("ALLOW", {"rules": [FROM_WEB]})), req("db"), False, False),
    (
        "plaintext vs principals",
        policies(("ALLOW", {"rules": [FROM_WEB]})),
        req(None),
        False,
        False,
    ),
    (
        "principal suffix glob",
        policies(("ALLOW", {"rules": [{"from": [{"source": {"principals": ["*/sa/web"]}}]}]})),
        req("web", ns="other"),
        False,
        True,
    ),
    (
        "principal prefix glob",
        policies(
            (
                "ALLOW",
                {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/*"]}}]}]},
            )
        ),
        req("any"),
        False,
        True,
    ),
    (
        "star needs an identity",
        policies(("ALLOW", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})),
        req(None),
        False,
        False,
    ),
    (
        "notNamespaces",
        policies(("ALLOW", {"rules": [{"from": [{"source": {"notNamespaces": ["shop"]}}]}]})),
        req("web", ns="shop"),
        False,
        False,
    ),
    (
        "ipBlocks",
        policies(("ALLOW", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.1.0/24"]}}]}]})),
        req(),
        False,
        True,
    ),
    (
        "notPorts",
        policies(("ALLOW", {"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]})),
        req(port=8080),
        False,
        False,
    ),
    (
        "deny beats allow",
        policies(("ALLOW", {"rules": [{}]}), ("DENY", {"rules": [FROM_WEB]})),
        req("web"),
        False,
        False,
    ),
    ("deny only, not matching", policies(("DENY", {"rules": [FROM_WEB]})), req("db"), False, True),
    # L7 attributes at ztunnel: fail closed both ways.
    (
        "L7 allow at L4 never matches",
        policies(("ALLOW", {"rules": [GET_ONLY]})),
        req(method="GET"),
        False,
        False,
    ),
    (
        "L7 deny at L4 matches on L4 fields",
        policies(("DENY", {"rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]})),
        req(),
        False,
        False,
    ),
    (
        "L7 deny at L4 still needs its ports",
        policies(
            (
                "DENY",
                {"rules": [{"to": [{"operation": {"methods": ["DELETE"], "ports": ["9090"]}}]}]},
            )
        ),
        req(port=8080),
        False,
        True,
    ),
    (
        "L7 allow at waypoint GET",
        policies(("ALLOW", {"rules": [GET_ONLY]})),
        req(method="GET", path="/"),
        True,
        True,
    ),
    (
        "L7 allow at waypoint POST",
        policies(("ALLOW", {"rules": [GET_ONLY]})),
        req(method="POST", path="/"),
        True,
        False,
    ),
    (
        "L7 deny at waypoint other method",
        policies(("DENY", {"rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]})),
        req(method="GET"),
        True,
        True,
    ),
    (
        "paths prefix glob, query ignored",
        policies(("ALLOW", {"rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]})),
        req(method="GET", path="/api/x?y=1"),
        True,
        True,
    ),
    (
        "notPaths",
        policies(("ALLOW", {"rules": [{"to": [{"operation": {"notPaths": ["/admin*"]}}]}]})),
        req(method="GET", path="/admin/x"),
        True,
        False,
    ),
    (
        "hosts case-insensitive",
        policies(("ALLOW", {"rules": [{"to": [{"operation": {"hosts": ["*.Example.com"]}}]}]})),
        req(method="GET", host="api.example.COM"),
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    ("name", "pols", "request_", "l7", "allowed"), CASES, ids=[c[0] for c in CASES]
)
def test_table(name: str, pols: PolicySet, request_: AuthzRequest, l7: bool, allowed: bool) -> None:
    assert authorize(pols, request_, l7=l7).allowed is allowed


def test_decision_names_policy() -> None:
    pols = policies(("ALLOW", {"rules": [{}]}), ("DENY", {"rules": [FROM_WEB]}))
    d = authorize(pols, req("web"), l7=False)
    assert (d.allowed, d.policy) == (False, "shop/p1-deny")
    d = authorize(pols, req("db"), l7=False)
    assert (d.allowed, d.policy) == (True, "shop/p0-allow")


def test_compiled_once_per_object() -> None:
    pols = policies(("ALLOW", {"rules": [FROM_WEB]}))
    assert compile_policy(pols.allow[0]) is compile_policy(pols.allow[0])


def test_waypoint_policies_by_target_ref() -> None:
    def pol(name: str, ns: str, ref: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"targetRefs": [ref], "action": "DENY", "rules": [{}]},
        }

    snap = parse_objects(
        [
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "wp", "namespace": "shop"},
                "spec": {"gatewayClassName": "waypoint"},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"port": 80}]},
            },
            pol("on-gw", "shop", {"kind": "Gateway", "name": "wp"}),
            pol("on-svc", "shop", {"kind": "Service", "name": "web"}),
            pol("other-svc", "shop", {"kind": "Service", "name": "db"}),
            pol("mesh", "istio-system", {"kind": "GatewayClass", "name": "waypoint"}),
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "l4", "namespace": "shop"},
                "spec": {},
            },
        ]
    )
    wp = snap.waypoint("shop", "wp")
    assert wp is not None
    got = waypoint_policies(snap, wp, snap.service("shop", "web"))
    assert sorted(p.key for p in got.deny) == ["istio-system/mesh", "shop/on-gw", "shop/on-svc"]
    assert got.allow == ()
