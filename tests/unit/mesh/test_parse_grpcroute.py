"""GRPCRoute parsing: as strict as HTTPRoute's, errors naming object and field, and compiled
into the HTTPRoute model the waypoint routes with."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.config.model import FilterType, GRPCMethodMatch, PathMatchType, ValueMatchType
from mesh.config.parse import ConfigErrors, parse_objects


def grpc_route(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "echo", "namespace": "grpc"},
        "spec": {
            "parentRefs": [{"kind": "Service", "group": "", "name": "echo", "port": 50051}],
            "rules": list(rules),
            **spec,
        },
    }


def errors_of(*docs: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as ei:
        parse_objects(list(docs))
    return [str(e) for e in ei.value.errors]


def test_grpc_route_compiles_into_the_route_model() -> None:
    snap = parse_objects(
        [
            grpc_route(
                {
                    "name": "split",
                    "matches": [
                        {"method": {"service": "echo.Echo", "method": "Say"}},
                        {"method": {"service": "echo.Echo"}},
                        {"method": {"method": "Say"}},
                        {
                            "method": {"type": "RegularExpression", "service": r"echo\..*"},
                            "headers": [{"name": "X-Tier", "value": "gold"}],
                        },
                    ],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]},
                        },
                        {
                            "type": "RequestMirror",
                            "requestMirror": {"backendRef": {"name": "shadow", "port": 50051}},
                        },
                    ],
                    "backendRefs": [
                        {"name": "echo-v1", "port": 50051, "weight": 3},
                        {"name": "echo-v2", "port": 50051, "weight": 1},
                    ],
                }
            )
        ]
    )
    (r,) = snap.http_routes
    assert (r.kind, r.key) == ("GRPCRoute", "grpc/echo")
    (rule,) = r.rules
    assert rule.name == "split"
    paths = [(m.path.type, m.path.value) for m in rule.matches if m.path is not None]
    assert paths == [
        (PathMatchType.EXACT, "/echo.Echo/Say"),
        (PathMatchType.REGULAR_EXPRESSION, r"/echo\.Echo/[^/]+"),
        (PathMatchType.REGULAR_EXPRESSION, "/[^/]+/Say"),
        (PathMatchType.REGULAR_EXPRESSION, r"/(?:echo\..*)/[^/]+"),
    ]
    assert rule.matches[3].headers[0].name == "x-tier"
    assert [m.grpc_method for m in rule.matches] == [
        GRPCMethodMatch(ValueMatchType.EXACT, "echo.Echo", "Say"),
        GRPCMethodMatch(ValueMatchType.EXACT, "echo.Echo", None),
        GRPCMethodMatch(ValueMatchType.EXACT, None, "Say"),
        GRPCMethodMatch(ValueMatchType.REGULAR_EXPRESSION, r"echo\..*", None),
    ]
    assert [f.type for f in rule.filters] == [
        FilterType.REQUEST_HEADER_MODIFIER,
        FilterType.REQUEST_MIRROR,
    ]
    assert [(b.name, b.weight) for b in rule.backend_refs] == [("echo-v1", 3), ("echo-v2", 1)]


def test_grpc_route_and_http_route_of_one_name_coexist() -> None:
    http = grpc_route({"backendRefs": [{"name": "a", "port": 1}]})
    http["kind"] = "HTTPRoute"
    snap = parse_objects([http, grpc_route({"backendRefs": [{"name": "a", "port": 1}]})])
    assert sorted(r.kind for r in snap.http_routes) == ["GRPCRoute", "HTTPRoute"]


def test_grpc_route_errors_name_object_and_field() -> None:
    errs = errors_of(
        grpc_route(
            {
                "matches": [
                    {"method": {"service": "echo.Echo", "method": "Say"}},
                    {"method": {"service": "echo/Echo"}},
                    {"method": {"method": "Say.Hi"}},
                    {"method": {"type": "RegularExpression", "method": "(unclosed"}},
                    {"method": {"type": "Prefix", "service": "a"}},
                    {"method": {}},
                    {"path": {"value": "/x"}},
                    {"headers": [{"name": "bad header", "value": "v"}]},
                    {"method": {"service": "a", "serivce": "typo"}},
                ],
                "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "x"}},
                    {"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}},
                    {"type": "RequestHeaderModifier"},
                ],
                "backendRefs": [
                    {"name": "echo", "port": 50051, "weight": -1},
                    {
                        "name": "echo",
                        "port": 50051,
                        "filters": [{"type": "URLRewrite", "urlRewrite": {}}],
                    },
                    {"name": "echo"},
                ],
                "timeouts": {"request": "1s"},
            },
        )
    )
    p = "GRPCRoute grpc/echo: spec.rules[0]"
    assert errs == [
        f"{p}.timeouts is not a field of a GRPCRoute rule",
        f"{p}.matches[1].method.service 'echo/Echo' is not a valid gRPC service name",
        f"{p}.matches[2].method.method 'Say.Hi' is not a valid gRPC method name",
        f"{p}.matches[3].method.method invalid regular expression: "
        "missing ), unterminated subpattern at position 0",
        f"{p}.matches[4].method.type must be Exact or RegularExpression",
        f"{p}.matches[5].method must set service, method or both",
        f"{p}.matches[6].path is not a field of a GRPCRoute match",
        f"{p}.matches[7].headers[0].name 'bad header' is not a valid name",
        f"{p}.matches[8].method.serivce is not a field of a gRPC method match",
        f"{p}.filters[0].type unsupported filter type 'URLRewrite'",
        f"{p}.filters[1].type unsupported filter type 'RequestRedirect'",
        f"{p}.filters[2].requestHeaderModifier is required for type RequestHeaderModifier",
        f"{p}.backendRefs[0].weight must be >= 0",
        f"{p}.backendRefs[1].filters[0].type unsupported filter type 'URLRewrite'",
        f"{p}.backendRefs[2].port is required for a Service backend",
    ]


def test_grpc_route_parent_refs_like_http_route() -> None:
    errs = errors_of(
        grpc_route(
            parentRefs=[
                {"kind": "Service", "group": "apps", "name": "echo"},
                {"kind": "Pod", "name": "echo"},
                {"kind": "Gateway", "name": "Not_A_Label"},
            ]
        )
    )
    assert errs == [
        'GRPCRoute grpc/echo: spec.parentRefs[0].group must be "" for kind Service',
        "GRPCRoute grpc/echo: spec.parentRefs[1].kind must be Service or Gateway",
        "GRPCRoute grpc/echo: spec.parentRefs[2].name 'Not_A_Label' is not a valid DNS-1123 label",
    ]
    snap = parse_objects([grpc_route(parentRefs=[{"name": "waypoint"}])])
    (ref,) = snap.http_routes[0].parent_refs
    assert (ref.kind, ref.name, ref.namespace) == ("Gateway", "waypoint", "grpc")


def test_only_v1_grpc_route_is_read() -> None:
    old = grpc_route()
    old["apiVersion"] = "gateway.networking.k8s.io/v1alpha2"
    ignored: list[str] = []
    snap = parse_objects([old], ignored=ignored)
    assert snap.http_routes == ()
    assert ignored == ["GRPCRoute grpc/echo (gateway.networking.k8s.io/v1alpha2)"]


def test_grpc_route_retry_takes_grpc_status_names_or_numbers() -> None:
    snap = parse_objects(
        [grpc_route({"retry": {"attempts": 2, "codes": ["UNAVAILABLE", 8], "backoff": "10ms"}})]
    )
    (route,) = snap.http_routes
    retry = route.rules[0].retry
    assert (retry.attempts, retry.grpc_codes, retry.codes) == (2, (14, 8), ())
    assert retry.backoff == pytest.approx(0.01)


def test_grpc_route_retry_errors_name_the_field() -> None:
    errs = errors_of(
        grpc_route(
            {"retry": {"attempts": 1, "codes": ["UNAVAILIBLE", 0, 503, True]}},
            {"retry": {"attempts": 2}},
            {"retry": {"attempts": -1, "codes": [14], "perTry": "1s"}},
        )
    )
    text = "\n".join(errs)
    for field in ("rules[0].retry.codes[0]", "rules[0].retry.codes[1]",
                  "rules[0].retry.codes[2]", "rules[0].retry.codes[3]",
                  "rules[1].retry.codes", "rules[2].retry.attempts",
                  "rules[2].retry.perTry"):  # fmt: skip
        assert field in text, (field, text)
    assert "'UNAVAILIBLE' is not a gRPC error status" in text
