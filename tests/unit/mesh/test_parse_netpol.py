"""NetworkPolicy and CiliumNetworkPolicy parsing: the article's examples load, and everything
outside the supported subset is refused by name instead of being dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.config.model import CiliumEntity, CiliumHTTPRule
from mesh.config.parse import ConfigErrors, load_snapshot, parse_objects

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "examples" / "cilium" / "policies.yaml"


def _cnp(spec: Any, name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


def _np(spec: Any, name: str = "n") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


def _errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as ei:
        parse_objects([doc])
    return [str(e) for e in ei.value.errors]


def test_article_examples_parse() -> None:
    snap = load_snapshot([EXAMPLE])
    cnps = {p.name: p for p in snap.cilium_policies}
    assert sorted(cnps) == [
        "allow-http-to-backend",
        "database-lockdown",
        "frontend-to-backend",
        "mtls-backend",
    ]
    http = cnps["allow-http-to-backend"]
    assert dict(http.endpoint_selector) == {"app": "backend"}
    assert http.egress is None and http.ingress is not None
    rule = http.ingress[0]
    assert [dict(e) for e in rule.endpoints] == [{"app": "frontend"}]
    assert rule.to_ports[0].ports == (8080,)
    assert rule.to_ports[0].http == (CiliumHTTPRule("GET", "/api/.*"),)
    assert http.has_l7
    mtls = cnps["mtls-backend"]
    assert mtls.ingress is not None and mtls.ingress[0].auth_required
    assert not mtls.has_l7
    db = cnps["database-lockdown"]
    assert db.ingress is not None and db.egress is not None
    assert dict(db.ingress[0].endpoints[0]) == {"app": "backend", "env": "production"}
    assert db.ingress[0].to_ports[0].ports == (5432,)
    assert db.egress[0].entities == (CiliumEntity.WORLD,)
    fe = cnps["frontend-to-backend"]
    assert fe.ingress is None and fe.egress is not None
    assert fe.egress[0].to_ports[0].ports == (8080,)  # protocol left out: TCP
    (np,) = snap.network_policies
    assert np.key == "shop/postgres-from-backend"
    assert np.policy_types == ("Ingress",)
    assert dict(np.ingress[0].peers[0].pod_selector or {}) == {"app": "backend"}
    assert np.ingress[0].ports[0].port == 5432


def test_shared_article_file_matches_committed_policies() -> None:
    """The committed examples are the article's, not a paraphrase: same specs, namespace added."""
    shared = Path("/work/shared/examples/cilium-policies.yaml")
    if not shared.exists():
        pytest.skip("shared article examples not on this machine")
    theirs = [d for d in yaml.safe_load_all(shared.read_text()) if d]
    ours = [
        d
        for d in yaml.safe_load_all(EXAMPLE.read_text())
        if d and d["kind"] == "CiliumNetworkPolicy"
    ]
    assert [d["spec"] for d in theirs] == [d["spec"] for d in ours]


def test_cnp_to_cidr_and_auth_disabled() -> None:
    snap = parse_objects(
        [
            _cnp(
                {
                    "endpointSelector": {"matchLabels": {"app": "a"}},
                    "egress": [{"toCIDR": ["10.1.0.0/16", "192.168.1.1/32"]}],
                    "ingress": [{"authentication": {"mode": "disabled"}}],
                }
            )
        ]
    )
    (p,) = snap.cilium_policies
    assert p.egress is not None and p.egress[0].cidrs == ("10.1.0.0/16", "192.168.1.1/32")
    assert p.ingress is not None and not p.ingress[0].auth_required


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"endpointSelector": {}, "ingressDeny": []},
            "CiliumNetworkPolicy shop/p: spec.ingressDeny is not supported: ",
        ),
        (
            {"endpointSelector": {"matchExpressions": []}},
            "CiliumNetworkPolicy shop/p: spec.endpointSelector.matchExpressions is not supported",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toEntities": ["cluster"]}]},
            "CiliumNetworkPolicy shop/p: spec.egress[0].toEntities[0] is not supported: "
            "'cluster' (only world)",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "x.com"}]}]},
            "CiliumNetworkPolicy shop/p: spec.egress[0].toFQDNs is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toEntities": ["world"]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toEntities is not supported",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.0/8"]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].fromCIDR is not supported",
        ),
        (
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}],
            },
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].ports[0].protocol is not "
            "supported: 'UDP'",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "http"}]}]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].ports[0].port is not "
            "supported: named port 'http'",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].ports[0].port must be "
            "between 1 and 65535",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"rules": {"dns": []}}]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].rules.dns is not supported",
        ),
        (
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"rules": {"http": [{"headers": ["X: y"]}]}}]}],
            },
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].rules.http[0].headers is not "
            "supported",
        ),
        (
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"rules": {"http": [{"path": "("}]}}]}],
            },
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].rules.http[0].path invalid "
            "regular expression",
        ),
        (
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"rules": {"http": [{"method": "FETCH"}]}}]}],
            },
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].rules.http[0].method 'FETCH' "
            "is not an HTTP method",
        ),
        (
            {"endpointSelector": {}, "ingress": [{"authentication": {"mode": "sometimes"}}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].authentication.mode must be required "
            "or disabled",
        ),
        (
            {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.300/8"]}]},
            "CiliumNetworkPolicy shop/p: spec.egress[0].toCIDR[0] '10.0.0.300/8' is not a CIDR",
        ),
        (
            {"ingress": []},
            "CiliumNetworkPolicy shop/p: spec.endpointSelector is required",
        ),
        (
            {"endpointSelector": {"matchLabels": {"app": "a b"}}},
            "CiliumNetworkPolicy shop/p: spec.endpointSelector.matchLabels.app 'a b' is not a "
            "valid label value",
        ),
        ("nope", "CiliumNetworkPolicy shop/p: spec must be a mapping"),
        (  # a Unicode digit passes str.isdigit but not int(): once a crash
            {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "\u00b2"}]}]}]},
            "CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].ports[0].port is not supported",
        ),
    ],
)
def test_cnp_refusals(spec: Any, expected: str) -> None:
    errs = _errors(_cnp(spec))
    assert any(e.startswith(expected) for e in errs), errs


def test_cnp_specs_plural_refused() -> None:
    doc = _cnp({"endpointSelector": {}})
    doc["specs"] = [{"endpointSelector": {}}]
    assert any(
        e.startswith("CiliumNetworkPolicy shop/p: specs is not supported") for e in _errors(doc)
    )


def test_cnp_other_api_version_is_ignored_not_accepted() -> None:
    doc = _cnp({"endpointSelector": {}})
    doc["apiVersion"] = "cilium.io/v1"
    ignored: list[str] = []
    snap = parse_objects([doc], ignored=ignored)
    assert snap.cilium_policies == ()
    assert ignored == ["CiliumNetworkPolicy shop/p (cilium.io/v1)"]


def test_network_policy_defaults_and_peers() -> None:
    snap = parse_objects(
        [
            _np(
                {
                    "podSelector": {},
                    "egress": [
                        {
                            "to": [
                                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                                {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                                {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"x": "y"}},
                                },
                            ],
                            "ports": [{"port": 443}, {"protocol": "TCP"}],
                        }
                    ],
                }
            )
        ]
    )
    (np,) = snap.network_policies
    assert np.policy_types == ("Ingress", "Egress")  # Kubernetes' default with egress rules
    assert dict(np.pod_selector) == {}
    peers = np.egress[0].peers
    assert peers[0].ip_block == "10.0.0.0/8" and peers[0].ip_block_except == ("10.1.0.0/16",)
    assert peers[1].pod_selector is None and dict(peers[1].namespace_selector or {"-": ""}) == {
        "team": "a"
    }
    assert peers[2].namespace_selector is not None and dict(peers[2].namespace_selector) == {}
    assert [p.port for p in np.egress[0].ports] == [443, None]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "NetworkPolicy shop/n: spec.podSelector is required"),
        (
            {"podSelector": {}, "policyTypes": ["Both"]},
            "NetworkPolicy shop/n: spec.policyTypes[0] 'Both' must be Ingress or Egress",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]},
            "NetworkPolicy shop/n: spec.ingress[0].ports[0].protocol is not supported: 'UDP'",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 90}]}]},
            "NetworkPolicy shop/n: spec.ingress[0].ports[0].endPort is not supported",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]},
            "NetworkPolicy shop/n: spec.ingress[0].ports[0].port is not supported: named port",
        ),
        (
            {"podSelector": {}, "ingress": [{"to": []}]},
            "NetworkPolicy shop/n: spec.ingress[0].to is not supported",
        ),
        (
            {"podSelector": {}, "ingress": [{"from": [{}]}]},
            "NetworkPolicy shop/n: spec.ingress[0].from[0] must set podSelector",
        ),
        (
            {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "x"}}]}]},
            "NetworkPolicy shop/n: spec.ingress[0].from[0].ipBlock.cidr 'x' is not a CIDR",
        ),
        (
            {
                "podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}],
            },
            "NetworkPolicy shop/n: spec.ingress[0].from[0].ipBlock must not be set together",
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}},
            "NetworkPolicy shop/n: spec.podSelector.matchExpressions is not supported",
        ),
    ],
)
def test_network_policy_refusals(spec: Any, expected: str) -> None:
    errs = _errors(_np(spec))
    assert any(e.startswith(expected) for e in errs), errs


def test_duplicate_policies_are_errors() -> None:
    with pytest.raises(ConfigErrors) as ei:
        parse_objects([_np({"podSelector": {}}), _np({"podSelector": {}})])
    assert "NetworkPolicy shop/n: metadata.name is defined twice" in str(ei.value)
