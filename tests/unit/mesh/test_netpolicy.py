"""Policy decisions on the article's examples (deploy/examples/cilium/policies.yaml): what the
cgroup connect() program and ztunnel will be told, for each kind of peer and rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.netpolicy import Decision, Direction, Verdict, decide

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "examples" / "cilium" / "policies.yaml"

FRONTEND, BACKEND, POSTGRES, NODE, BACKEND_VIP = (
    "10.77.1.10",
    "10.77.1.11",
    "10.77.1.12",
    "10.77.0.1",
    "10.96.1.11",
)
OUTSIDE = "198.51.100.7"  # TEST-NET-2: never dialled, only decided on
EG, IN = Direction.EGRESS, Direction.INGRESS
HTTP_CNP = "CiliumNetworkPolicy shop/allow-http-to-backend"
MTLS_CNP = "CiliumNetworkPolicy shop/mtls-backend"
DB_CNP = "CiliumNetworkPolicy shop/database-lockdown"
FE_CNP = "CiliumNetworkPolicy shop/frontend-to-backend"
DB_NP = "NetworkPolicy shop/postgres-from-backend"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def _pod(name: str, ip: str, labels: dict[str, str], ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node1"},
        "status": {"podIP": ip},
    }


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return parse_objects(_docs())


def _d(snap: Snapshot, src: str, dst: str, port: int, d: Direction, auth: bool = False) -> Decision:
    source = snap.pod_by_ip(src) or src
    return decide(snap, source, dst, port, d, authenticated=auth)


@pytest.mark.parametrize(
    ("src", "dst", "port", "direction", "auth", "verdict", "policy"),
    [
        # frontend-to-backend: frontend may reach backend:8080 and nothing else.
        (FRONTEND, BACKEND, 8080, EG, False, Verdict.ALLOW, FE_CNP),
        (FRONTEND, BACKEND, 9090, EG, False, Verdict.DENY, FE_CNP),
        (FRONTEND, POSTGRES, 5432, EG, False, Verdict.DENY, FE_CNP),
        (FRONTEND, OUTSIDE, 443, EG, False, Verdict.DENY, FE_CNP),
        # database-lockdown egress: world only; pods, nodes and service VIPs are not world.
        (POSTGRES, OUTSIDE, 443, EG, False, Verdict.ALLOW, DB_CNP),
        (POSTGRES, BACKEND, 8080, EG, False, Verdict.DENY, DB_CNP),
        (POSTGRES, NODE, 10250, EG, False, Verdict.DENY, DB_CNP),
        (POSTGRES, BACKEND_VIP, 8080, EG, False, Verdict.DENY, DB_CNP),
        # postgres ingress: backend (production) on 5432 only; the NetworkPolicy decides first.
        (BACKEND, POSTGRES, 5432, IN, False, Verdict.ALLOW, DB_NP),
        (BACKEND, POSTGRES, 5433, IN, False, Verdict.DENY, DB_NP),
        (FRONTEND, POSTGRES, 5432, IN, False, Verdict.DENY, DB_NP),
        # backend ingress: frontend only over mTLS (mtls-backend's requirement wins over
        # allow-http-to-backend's plaintext-free GET rule, as Cilium merges them), then
        # anything; others: GET /api/.* on 8080 would be the waypoint's job, but no rule
        # admits them.
        (FRONTEND, BACKEND, 8080, IN, False, Verdict.DENY, MTLS_CNP),
        (FRONTEND, BACKEND, 8080, IN, True, Verdict.ALLOW, MTLS_CNP),
        (FRONTEND, BACKEND, 9090, IN, False, Verdict.DENY, MTLS_CNP),
        (FRONTEND, BACKEND, 9090, IN, True, Verdict.ALLOW, MTLS_CNP),
        (OUTSIDE, BACKEND, 8080, IN, True, Verdict.DENY, HTTP_CNP),
        (POSTGRES, BACKEND, 8080, IN, False, Verdict.DENY, HTTP_CNP),
        # Nothing isolates frontend's ingress or backend's egress.
        (BACKEND, FRONTEND, 3000, IN, False, Verdict.ALLOW, None),
        (BACKEND, OUTSIDE, 443, EG, False, Verdict.ALLOW, None),
        # No mesh pod on the deciding side: not ours to decide.
        (OUTSIDE, "203.0.113.9", 80, EG, False, Verdict.ALLOW, None),
        (FRONTEND, OUTSIDE, 80, IN, False, Verdict.ALLOW, None),
    ],
)
def test_article_examples(
    snap: Snapshot,
    src: str,
    dst: str,
    port: int,
    direction: Direction,
    auth: bool,
    verdict: Verdict,
    policy: str | None,
) -> None:
    got = _d(snap, src, dst, port, direction, auth)
    assert (got.verdict, got.policy) == (verdict, policy), got.reason
    assert got.allowed == (verdict is not Verdict.DENY)


def test_kinds_are_unioned() -> None:
    """backend-2 lacks env=production, so database-lockdown does not admit it; the
    NetworkPolicy does. Without the NetworkPolicy the CNP alone denies."""
    docs = [*_docs(), _pod("backend-2", "10.77.1.13", {"app": "backend"})]
    snap = parse_objects(docs)
    assert _d(snap, "10.77.1.13", POSTGRES, 5432, IN).policy == DB_NP
    snap = parse_objects([d for d in docs if d["kind"] != "NetworkPolicy"])
    got = _d(snap, "10.77.1.13", POSTGRES, 5432, IN)
    assert (got.verdict, got.policy) == (Verdict.DENY, DB_CNP)


def test_network_policy_peers_ip_blocks_and_namespaces() -> None:
    docs = [
        *_docs(),
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "ops", "labels": {"team": "ops"}},
        },
        _pod("tool", "10.77.2.5", {"app": "tool"}, ns="ops"),
        _pod("other", "10.77.2.6", {"app": "other"}, ns="ops"),
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "frontend-in", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "frontend"}},
                "ingress": [
                    {
                        "from": [
                            {"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.7/32"]}}
                        ]
                    },
                    {
                        "from": [
                            {
                                "namespaceSelector": {"matchLabels": {"team": "ops"}},
                                "podSelector": {"matchLabels": {"app": "tool"}},
                            }
                        ],
                        "ports": [{"port": 3000}],
                    },
                ],
            },
        },
    ]
    snap = parse_objects(docs)
    np = "NetworkPolicy shop/frontend-in"
    assert _d(snap, "198.51.100.8", FRONTEND, 1, IN) == Decision(
        Verdict.ALLOW, np, "allowed by a rule"
    )
    assert _d(snap, OUTSIDE, FRONTEND, 1, IN).verdict is Verdict.DENY  # the except
    assert _d(snap, "2001:db8::1", FRONTEND, 1, IN).verdict is Verdict.DENY  # other family
    assert _d(snap, "10.77.2.5", FRONTEND, 3000, IN).verdict is Verdict.ALLOW
    assert _d(snap, "10.77.2.5", FRONTEND, 3001, IN).verdict is Verdict.DENY
    assert _d(snap, "10.77.2.6", FRONTEND, 3000, IN).verdict is Verdict.DENY
    # A pod selector without a namespace selector means the policy's own namespace only.
    assert _d(snap, BACKEND, FRONTEND, 3000, IN).verdict is Verdict.DENY


def test_cnp_to_cidr_and_port_only_rule() -> None:
    docs = [
        *_docs(),
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "backend-out", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "backend"}},
                "egress": [
                    {"toCIDR": ["198.51.100.0/24"]},
                    {"toPorts": [{"ports": [{"port": "53"}]}]},  # any peer, port 53
                ],
            },
        },
    ]
    snap = parse_objects(docs)
    assert _d(snap, BACKEND, OUTSIDE, 443, EG).verdict is Verdict.ALLOW
    assert _d(snap, BACKEND, "203.0.113.9", 443, EG).verdict is Verdict.DENY
    assert _d(snap, BACKEND, "203.0.113.9", 53, EG).verdict is Verdict.ALLOW
    assert _d(snap, BACKEND, POSTGRES, 53, EG).verdict is Verdict.ALLOW


def test_empty_section_isolates() -> None:
    """`egress: []` is a wall with no holes (Cilium's default-deny on a present section)."""
    docs = [
        *_docs(),
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "backend-quiet", "namespace": "shop"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "backend"}}, "egress": []},
        },
    ]
    got = _d(parse_objects(docs), BACKEND, OUTSIDE, 443, EG)
    assert (got.verdict, got.policy) == (Verdict.DENY, "CiliumNetworkPolicy shop/backend-quiet")


def test_an_auth_requirement_wins_over_a_plain_rule_for_the_same_flow() -> None:
    """Cilium merges the rules that select a flow and the authentication requirement wins:
    another policy's plain L4 rule for the same peer and port does not let plaintext past
    mtls-backend; with mTLS the flow is admitted."""
    docs = [
        *_docs(),
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "backend-open", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "backend"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}],
            },
        },
    ]
    snap = parse_objects(docs)
    got = _d(snap, FRONTEND, BACKEND, 8080, IN)
    assert (got.verdict, got.policy) == (Verdict.DENY, MTLS_CNP), got
    assert _d(snap, FRONTEND, BACKEND, 8080, IN, auth=True).allowed
