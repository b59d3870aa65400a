"""GRPCRoute through the shared route engine: method/header matching, gRPC-only matching,
weights and header filters, from parsed manifests (so parse and routing agree)."""

from __future__ import annotations

from typing import Any

from mesh.config.model import HTTPRoute
from mesh.config.parse import parse_objects
from waypoint.routing import Forward, Request, RouteTable, apply_filters, is_grpc

GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


def grpc_route(name: str, *rules: dict[str, Any], kind: str = "GRPCRoute") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "grpc"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "echo"}], "rules": list(rules)},
    }


def table(*docs: dict[str, Any]) -> RouteTable:
    routes: tuple[HTTPRoute, ...] = parse_objects(list(docs)).http_routes
    return RouteTable(routes)


def backend_of(t: RouteTable, path: str, headers: list[tuple[str, str]] = GRPC) -> str | None:
    d = t.route(Request.from_target("POST", path, headers, host="echo"))
    if d is None:
        return None
    assert d.chooser is not None
    ref = d.chooser.choose(0.0)
    return ref.name if ref else None


def rule(backend: str, *matches: dict[str, Any]) -> dict[str, Any]:
    return {"matches": list(matches), "backendRefs": [{"name": backend, "port": 50051}]}


def test_is_grpc() -> None:
    assert is_grpc([("content-type", "application/grpc")])
    assert is_grpc([("content-type", "application/grpc+proto; charset=x")])
    assert not is_grpc([("content-type", "application/grpc-web")])
    assert not is_grpc([("content-type", "application/json")])
    assert not is_grpc([])


def test_method_matching_and_precedence() -> None:
    t = table(
        grpc_route(
            "r",
            rule("service", {"method": {"service": "echo.Echo"}}),
            rule("exact", {"method": {"service": "echo.Echo", "method": "Say"}}),
            rule("method", {"method": {"method": "Ping"}}),
            rule("rx", {"method": {"type": "RegularExpression", "service": "other\\..*"}}),
            rule("gold", {"headers": [{"name": "x-tier", "value": "gold"}]}),
            rule("any"),
        )
    )
    assert backend_of(t, "/echo.Echo/Say") == "exact"
    assert backend_of(t, "/echo.Echo/Shout") == "service"
    assert backend_of(t, "/health.Health/Ping") == "method"
    # GEP-1016: exact service characters count before exact method characters.
    assert backend_of(t, "/echo.Echo/Ping") == "service"
    assert backend_of(t, "/other.Thing/Do") == "rx"
    assert backend_of(t, "/x.Y/Z", [*GRPC, ("x-tier", "gold")]) == "gold"
    assert backend_of(t, "/x.Y/Z") == "any"
    # Exact means exact: case and segment boundaries matter.
    assert backend_of(t, "/echo.echo/Say") == "any"
    assert backend_of(t, "/echo.Echo/Say/extra") == "any"


def test_precedence_is_the_specs_not_rule_order() -> None:
    """Longer exact service, then longer exact method, then more headers; regex is a wildcard,
    so it ties with no match and rule order decides."""
    t = table(
        grpc_route(
            "r",
            rule("rx", {"method": {"type": "RegularExpression", "service": ".*"}}),
            rule("method", {"method": {"method": "Say"}}),
            rule("short", {"method": {"service": "a.B"}}),
            rule("hdr", {"method": {"service": "a.B"}, "headers": [{"name": "x", "value": "1"}]}),
            rule("long", {"method": {"service": "a.Bc"}}),
            rule("both", {"method": {"service": "a.B", "method": "Say"}}),
        )
    )
    assert backend_of(t, "/a.B/Say") == "both"
    assert backend_of(t, "/a.B/Other", [*GRPC, ("x", "1")]) == "hdr"
    assert backend_of(t, "/a.B/Other") == "short"
    assert backend_of(t, "/a.Bc/Say") == "long"
    assert backend_of(t, "/z.Z/Say") == "method"
    assert backend_of(t, "/z.Z/Other") == "rx"


def test_grpc_route_matches_only_grpc_requests() -> None:
    t = table(grpc_route("r", rule("g", {"method": {"service": "echo.Echo"}})))
    assert backend_of(t, "/echo.Echo/Say") == "g"
    assert backend_of(t, "/echo.Echo/Say", [("content-type", "application/json")]) is None


def test_grpc_and_http_route_of_one_name_share_a_service() -> None:
    t = table(
        grpc_route("same", rule("grpc-backend", {"method": {"service": "echo.Echo"}})),
        grpc_route("same", rule("http-backend"), kind="HTTPRoute"),
    )
    assert backend_of(t, "/echo.Echo/Say") == "grpc-backend"
    assert backend_of(t, "/echo.Echo/Say", []) == "http-backend"


def test_weights_and_header_filters() -> None:
    t = table(
        grpc_route(
            "r",
            {
                "matches": [{"method": {"service": "echo.Echo", "method": "Say"}}],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "x-route", "value": "say"}],
                            "remove": ["x-drop"],
                        },
                    },
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"add": [{"name": "x-seen", "value": "1"}]},
                    },
                ],
                "backendRefs": [
                    {"name": "v1", "port": 50051, "weight": 3},
                    {"name": "v2", "port": 50051, "weight": 1},
                    {"name": "never", "port": 50051, "weight": 0},
                ],
            },
        )
    )
    req = Request.from_target("POST", "/echo.Echo/Say", [*GRPC, ("x-drop", "1")], host="echo")
    d = t.route(req)
    assert d is not None and d.rule is not None and d.chooser is not None
    picks = [d.chooser.choose(i / 400) for i in range(400)]
    names = [p.name for p in picks if p is not None]
    assert (names.count("v1"), names.count("v2"), names.count("never")) == (300, 100, 0)
    fwd = apply_filters(d.rule.filters, req, d.matched_prefix)
    assert isinstance(fwd, Forward)
    assert ("x-route", "say") in fwd.headers
    assert all(k != "x-drop" for k, _ in fwd.headers)
    assert [m.add for m in fwd.response_modifiers] == [(("x-seen", "1"),)]
