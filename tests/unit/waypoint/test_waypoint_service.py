"""Snapshot → route table and endpoint choice, as a waypoint stream sees them."""

from __future__ import annotations

import pytest

from mesh.config.model import (
    BackendRef,
    HTTPRoute,
    ParentRef,
    Pod,
    RouteRule,
    Service,
    ServicePort,
)
from mesh.config.snapshot import Snapshot
from waypoint.routing import Request
from waypoint.service import NoBackend, ServiceRoutes

NS = "bookinfo"


def snap() -> Snapshot:
    pods = (
        Pod(NS, "reviews-v1-a", "10.0.0.1", "n1", labels={"app": "reviews", "version": "v1"}),
        Pod(NS, "reviews-v1-b", "10.0.0.2", "n2", labels={"app": "reviews", "version": "v1"}),
        Pod(NS, "reviews-v2-a", "10.0.0.3", "n1", labels={"app": "reviews", "version": "v2"}),
    )
    svcs = (
        Service(
            NS, "reviews", "10.96.0.10", (ServicePort(9080, 8080),), selector={"app": "reviews"}
        ),
        Service(
            NS, "reviews-v2", "10.96.0.12", (ServicePort(9080, 8081),), selector={"version": "v2"}
        ),
        Service(NS, "empty", "10.96.0.13", (ServicePort(80, 80),), selector={"app": "none"}),
    )
    route = HTTPRoute(
        NS,
        "reviews",
        (ParentRef("Service", "reviews", NS, 9080),),
        rules=(RouteRule(backend_refs=(BackendRef("reviews-v2", NS, 9080),)),),
    )
    other_port = HTTPRoute(
        NS, "other", (ParentRef("Service", "reviews", NS, 1234),), rules=(RouteRule(),)
    )
    return Snapshot(pods=pods, services=svcs, http_routes=(route, other_port))


def test_authority_to_table_and_endpoints() -> None:
    sr = ServiceRoutes(snap())
    found = sr.for_authority("10.96.0.10:9080")
    assert found is not None
    svc, port, table = found
    assert (svc.name, port) == ("reviews", 9080)

    d = table.route(Request.from_target("GET", "/"))
    assert (
        d is not None and d.route is not None and d.route.name == "reviews"
    )  # port-1234 route excluded
    assert sr.table(svc, 9080) is table  # compiled once per snapshot
    assert d.chooser is not None
    ref = d.chooser.choose(0.1)
    t = sr.pick(svc, port, ref)
    assert (t.ip, t.port, t.service) == ("10.0.0.3", 8081, f"{NS}/reviews-v2")
    # Default backend: the Service itself, round-robin over its endpoints.
    ips = {sr.pick(svc, port, None).ip for _ in range(6)}
    assert ips == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert sr.for_authority("10.96.0.99:9080") is None
    assert sr.for_authority("garbage") is None


def test_no_endpoints_and_missing_service_name_the_problem() -> None:
    sr = ServiceRoutes(snap())
    empty = sr.snapshot.service(NS, "empty")
    assert empty is not None
    with pytest.raises(NoBackend, match="bookinfo/empty port 80 has no ready endpoints"):
        sr.pick(empty, 80, None)
    with pytest.raises(NoBackend, match="bookinfo/ghost does not exist"):
        sr.pick(empty, 80, BackendRef("ghost", NS, 80))


def test_bad_route_is_dropped_and_reported_while_good_ones_serve() -> None:
    from mesh.config.model import PathMatch, PathMatchType, RouteMatch

    s = snap()
    bad = HTTPRoute(
        NS,
        "broken",
        (ParentRef("Service", "reviews", NS, 9080),),
        rules=(
            RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.REGULAR_EXPRESSION, "[")),)),
        ),
    )
    sr = ServiceRoutes(
        Snapshot(pods=s.pods, services=s.services, http_routes=(*s.http_routes, bad))
    )
    found = sr.for_authority("10.96.0.10:9080")
    assert found is not None
    d = found[2].route(Request.from_target("GET", "/"))
    assert d is not None and d.route is not None and d.route.name == "reviews"
    assert (
        sr.errors
        and "HTTPRoute bookinfo/broken: spec.rules[0].matches[0].path.value" in sr.errors[0]
    )
