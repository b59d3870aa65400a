"""Parsing and validation: each kind, and errors that name the object and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.config.model import FilterType, MtlsMode, PathMatchType, PolicyAction
from mesh.config.parse import ConfigErrors, load_snapshot, parse_duration, parse_objects

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "kinds.yaml"


def route(rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "rules": [rule],
        },
    }


def errors_of(docs: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(ConfigErrors) as ei:
        parse_objects(docs)
    return [str(e) for e in ei.value.errors]


def test_example_has_every_kind() -> None:
    snap = load_snapshot([EXAMPLE])
    assert [n.name for n in snap.nodes] == ["node1"]
    assert snap.nodes[0].address == "10.77.0.1"
    web = snap.pod("shop", "web-1")
    assert web is not None and web.ip == "10.77.1.5" and web.service_account == "web"
    assert web.command == ("python3", "-m", "http.server", "8080")
    assert snap.is_ambient(web)
    svc = snap.service("shop", "web")
    assert svc is not None and snap.service_by_vip("10.96.0.10", 80) == (svc, svc.ports[0])
    assert [e.port for e in snap.endpoints(svc, 80)] == [8080]
    wp = snap.waypoint_for_service(svc)
    assert wp is not None and wp.port == 15008
    assert [p.name for p in snap.waypoint_pods(wp)] == ["waypoint-1"]
    (r,) = snap.routes_for_service(svc)
    rule = r.rules[0]
    assert rule.matches[0].path is not None
    assert rule.matches[0].path.type is PathMatchType.PATH_PREFIX
    assert rule.matches[0].method == "GET"
    assert [b.weight for b in rule.backend_refs] == [90, 10]
    assert rule.timeouts.request == 10.0 and rule.timeouts.backend_request == 0.5
    assert rule.retry.attempts == 2 and rule.retry.codes == (503,) and rule.retry.backoff == 0.1
    assert rule.filters[0].type is FilterType.REQUEST_HEADER_MODIFIER
    assert [p.key for p in snap.policies_for(web).allow] == ["shop/web-allow"]
    deny = snap.authorization_policies[0]
    assert deny.action is PolicyAction.DENY and deny.target_refs[0].kind == "Service"
    assert snap.mtls_mode(web, 8080) is MtlsMode.STRICT


def test_defaults_and_unknown_kinds_skipped() -> None:
    snap = parse_objects(
        [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": "p"},
                        "status": {"conditions": [{"type": "Ready", "status": "False"}]},
                    },
                ],
            },
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "ingress"},
                "spec": {"gatewayClassName": "istio"},
            },
        ],
        version=7,
    )
    (pod,) = snap.pods
    assert (pod.namespace, pod.service_account, pod.ip, pod.ready) == (
        "default",
        "default",
        None,
        False,
    )
    assert snap.waypoints == () and snap.version == 7


def test_weight_error_names_object_and_field() -> None:
    msgs = errors_of(
        [
            route(
                {
                    "backendRefs": [
                        {"name": "a", "port": 80},
                        {"name": "b", "port": 80, "weight": -1},
                    ]
                }
            )
        ]
    )
    assert msgs == ["HTTPRoute default/reviews: spec.rules[0].backendRefs[1].weight must be >= 0"]


def test_all_errors_collected() -> None:
    bad_route = route(
        {
            "matches": [{"path": {"type": "RegularExpression", "value": "(["}}],
            "filters": [
                {"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}},
                {"type": "URLRewrite", "requestHeaderModifier": {}},
            ],
            "timeouts": {"request": "10 seconds"},
        }
    )
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": n},
            "status": {"podIP": "10.0.0.1"},
        }
        for n in ("a", "b")
    ]
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "Bad_Name"},
        "spec": {"clusterIP": "10.0.0.300", "ports": [{"port": 70000}]},
    }
    msgs = errors_of([bad_route, *pods, svc, pods[0]])
    assert (
        "HTTPRoute default/reviews: spec.rules[0].filters[0].requestRedirect.statusCode "
        "must be one of 301, 302, 303, 307, 308" in msgs
    )
    assert (
        "HTTPRoute default/reviews: spec.rules[0].filters[1].requestHeaderModifier "
        "must not be set for type URLRewrite" in msgs
    )
    assert (
        "HTTPRoute default/reviews: spec.rules[0].filters[1].urlRewrite "
        "is required for type URLRewrite" in msgs
    )
    assert any(
        m.startswith(
            "HTTPRoute default/reviews: spec.rules[0].matches[0].path.value "
            "invalid regular expression"
        )
        for m in msgs
    )
    assert any(
        m.startswith("HTTPRoute default/reviews: spec.rules[0].timeouts.request invalid duration")
        for m in msgs
    )
    assert "Pod default/b: status.podIP 10.0.0.1 is also default/a's" in msgs
    assert "Pod default/a: metadata.name is defined twice" in msgs
    assert "Service default/Bad_Name: metadata.name 'Bad_Name' is not a valid DNS-1123 name" in msgs
    assert "Service default/Bad_Name: spec.clusterIP '10.0.0.300' is not an IPv4 address" in msgs
    assert "Service default/Bad_Name: spec.ports[0].port must be between 1 and 65535" in msgs


def test_errors_str_lists_each_on_a_line() -> None:
    with pytest.raises(ConfigErrors) as ei:
        parse_objects(
            [
                route(
                    {
                        "backendRefs": [
                            {"name": "a", "port": 80, "weight": 2_000_000},
                            {"name": "b", "port": 0},
                        ]
                    }
                )
            ]
        )
    assert str(ei.value).splitlines() == [
        "HTTPRoute default/reviews: spec.rules[0].backendRefs[0].weight must be <= 1000000",
        "HTTPRoute default/reviews: spec.rules[0].backendRefs[1].port must be between 1 and 65535",
    ]


def test_duplicate_service_vip() -> None:
    svcs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": n},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }
        for n in ("a", "b")
    ]
    assert errors_of(svcs) == [
        "Service default/b: spec.clusterIP 10.96.0.1:80 is also Service default/a's"
    ]


def authz(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    }


def test_authorization_policy_errors() -> None:
    msgs = errors_of(
        [
            authz(
                {
                    "action": "CUSTOM",
                    "rules": [
                        {
                            "from": [
                                {
                                    "source": {
                                        "principals": ["spiffe://td/ns/a/sa/b", "a*b"],
                                        "ipBlocks": ["10.0.0.0/33"],
                                    }
                                }
                            ],
                            "to": [{"operation": {"ports": ["http"]}}],
                            "when": [{"key": "request.headers[x]", "values": ["y"]}],
                        }
                    ],
                }
            )
        ]
    )
    assert msgs == [
        "AuthorizationPolicy ns/p: spec.action CUSTOM is not supported: this mesh has no "
        "external authorizer (ext_authz); use ALLOW, DENY or AUDIT",
        "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.principals[1] "
        "'a*b': '*' is allowed only as a prefix or a suffix",
        "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.principals[0] "
        "write principals without 'spiffe://' (Istio's form)",
        "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.ipBlocks[0] "
        "'10.0.0.0/33' is not an IP address or CIDR",
        "AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.ports[0] 'http' is not a port",
    ]


def test_authorization_policy_parsed() -> None:
    snap = parse_objects(
        [
            authz(
                {
                    "targetRef": {
                        "kind": "Gateway",
                        "group": "gateway.networking.k8s.io",
                        "name": "wp",
                    },
                    "rules": [
                        {
                            "from": [
                                {"source": {"namespaces": ["a"], "notPrincipals": ["*/sa/bad"]}}
                            ],
                            "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
                        },
                        {},
                    ],
                }
            )
        ]
    )
    (pol,) = snap.authorization_policies
    assert pol.action is PolicyAction.ALLOW
    assert pol.target_refs[0].name == "wp"
    assert pol.rules[0].operations[0].ports == (8080,)
    assert pol.rules[0].operations[0].has_l7
    assert pol.rules[1].sources == () and pol.rules[1].operations == ()


def test_peer_authentication_port_level() -> None:
    snap = parse_objects(
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "pa", "namespace": "ns"},
                "spec": {
                    "selector": {"matchLabels": {"app": "x"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
                },
            }
        ]
    )
    (pa,) = snap.peer_authentications
    assert pa.mode is MtlsMode.STRICT and dict(pa.port_modes) == {8080: MtlsMode.PERMISSIVE}


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("1h2m", 3720.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1.5s", "-1s", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_bad_yaml_names_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kind: [unclosed\n")
    with pytest.raises(ConfigErrors) as ei:
        load_snapshot([tmp_path])
    assert str(ei.value).startswith(f"file {f}: ")


def test_backend_port_required_and_hostnames() -> None:
    doc = route({"backendRefs": [{"name": "a"}]})
    doc["spec"]["hostnames"] = ["*.example.com", "bad_host"]
    assert errors_of([doc]) == [
        "HTTPRoute default/reviews: spec.hostnames[1] 'bad_host' is not a valid hostname",
        "HTTPRoute default/reviews: spec.rules[0].backendRefs[0].port "
        "is required for a Service backend",
    ]
