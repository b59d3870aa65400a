"""CiliumNetworkPolicy HTTP rules as the waypoint gets them: which rules apply to a caller and
backend, Cilium's anchored method/path regexes, and L4-only rules that make them moot."""

from __future__ import annotations

from typing import Any

from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.netpolicy import http_rules, waypoint_http_rules


def pod(name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"nodeName": "n1"},
        "status": {"podIP": ip},
    }


def cnp(name: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "api"}}, "ingress": ingress},
    }


def l7(http: list[dict[str, str]], port: str = "8080", src: str = "web") -> dict[str, Any]:
    return {
        "fromEndpoints": [{"matchLabels": {"app": src}}],
        "toPorts": [{"ports": [{"port": port}], "rules": {"http": http}}],
    }


def world(*extra: dict[str, Any]) -> Snapshot:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {
            "clusterIP": "10.96.0.1",
            "selector": {"app": "api"},
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }
    return parse_objects(
        [pod("web", "10.0.0.1", {"app": "web"}), pod("api", "10.0.0.2", {"app": "api"}),
         pod("batch", "10.0.0.3", {"app": "batch"}), svc, *extra]
    )  # fmt: skip


def test_rules_match_whole_method_and_path() -> None:
    s = world(cnp("api-read", [l7([{"method": "GET|HEAD", "path": "/v1/items(/[0-9]+)?"}])]))
    r = http_rules(s, "10.0.0.1", "10.0.0.2", 8080, authenticated=True)
    assert r is not None and r.policy == "CiliumNetworkPolicy shop/api-read"
    assert r.allows("GET", "/v1/items") and r.allows("HEAD", "/v1/items/42")
    assert not r.allows("GETX", "/v1/items")  # anchored: not a prefix match
    assert not r.allows("GET", "/v1/items/42/x") and not r.allows("POST", "/v1/items")


def test_rules_from_several_policies_merge() -> None:
    s = world(
        cnp("a", [l7([{"method": "GET"}])]),
        cnp("b", [l7([{"method": "POST", "path": "/upload"}])]),
    )
    r = http_rules(s, "10.0.0.1", "10.0.0.2", 8080, authenticated=True)
    assert r is not None and r.allows("GET", "/x") and r.allows("POST", "/upload")
    assert not r.allows("POST", "/x")


def test_l4_only_rule_or_other_port_makes_no_http_rules() -> None:
    plain = {"fromEndpoints": [{"matchLabels": {"app": "web"}}]}
    s = world(cnp("a", [l7([{"method": "GET"}]), plain]))
    assert http_rules(s, "10.0.0.1", "10.0.0.2", 8080, authenticated=True) is None
    s = world(cnp("a", [l7([{"method": "GET"}], port="9090")]))
    assert http_rules(s, "10.0.0.1", "10.0.0.2", 8080, authenticated=True) is None  # L4 deny
    s = world(cnp("a", [l7([{"method": "GET"}])]))
    assert http_rules(s, "10.0.0.3", "10.0.0.2", 8080, authenticated=True) is None  # not a peer


def test_waypoint_rules_per_service_and_caller() -> None:
    s = world(cnp("a", [l7([{"method": "GET"}])]))
    svc = s.service("shop", "api")
    assert svc is not None
    (rules,) = waypoint_http_rules(s, svc, 80, "10.0.0.1")
    assert rules.allows("GET", "/") and not rules.allows("DELETE", "/")
    assert waypoint_http_rules(s, svc, 80, "10.0.0.3") == ()
    assert waypoint_http_rules(world(), svc, 80, "10.0.0.1") == ()
