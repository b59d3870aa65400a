"""Snapshot-driven waypoint over real sockets: VIP authority → HTTPRoute → backend pod port."""

from __future__ import annotations

import asyncio

from mesh.config.model import (
    BackendRef,
    HTTPRoute,
    ParentRef,
    PathMatch,
    PathMatchType,
    Pod,
    RouteMatch,
    RouteRule,
    Service,
    ServicePort,
)
from mesh.config.snapshot import Snapshot
from waypoint.proxy import WaypointStreams
from waypoint.service import ServiceRoutes, Target

NS = "bookinfo"


async def named_backend(name: str) -> asyncio.Server:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                target = head.split(b" ")[1]
                body = name.encode() + b" " + target
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def port_of(s: asyncio.Server) -> int:
    return int(s.sockets[0].getsockname()[1])


async def request(port: int, target: str) -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {target} HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n".encode())
    data = await r.read(-1)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_snapshot_routes_through_real_backends() -> None:
    v1, v2 = await named_backend("v1"), await named_backend("v2")
    pods = (
        Pod(NS, "reviews-v1", "127.0.0.1", "n1", labels={"app": "reviews", "version": "v1"}),
        Pod(NS, "reviews-v2", "127.0.0.2", "n1", labels={"app": "reviews", "version": "v2"}),
    )
    services = (
        Service(
            NS,
            "reviews",
            "10.96.0.10",
            (ServicePort(9080, port_of(v1)),),
            selector={"version": "v1"},
        ),
        Service(
            NS,
            "reviews-v2",
            "10.96.0.12",
            (ServicePort(9080, port_of(v2)),),
            selector={"version": "v2"},
        ),
    )
    route = HTTPRoute(
        NS,
        "reviews",
        (ParentRef("Service", "reviews", NS, 9080),),
        rules=(
            RouteRule(
                matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/v2")),),
                backend_refs=(BackendRef("reviews-v2", NS, 9080),),
            ),
        ),
    )
    current = ServiceRoutes(Snapshot(pods=pods, services=services, http_routes=(route,)))
    dialed: list[Target] = []

    async def dial(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        dialed.append(t)
        return await asyncio.open_connection(
            "127.0.0.1", t.port
        )  # loopback stands in for the pod IP

    streams = WaypointStreams(lambda: current, dial)
    assert streams.for_authority("10.96.0.99:9080") is None

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = streams.for_authority("10.96.0.10:9080")  # the HBONE :authority once the core lands
        assert s is not None
        await s.serve(r, w)

    wp = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        assert await request(port_of(wp), "/v2/ratings") == (200, b"v2 /v2/ratings")
        assert await request(port_of(wp), "/other") == (200, b"v1 /other")
        assert [(t.ip, t.service) for t in dialed] == [
            ("127.0.0.2", f"{NS}/reviews-v2"),
            ("127.0.0.1", f"{NS}/reviews"),
        ]
        # Config swap without the route: new streams use the Service itself.
        current = ServiceRoutes(Snapshot(pods=pods, services=services))
        assert await request(port_of(wp), "/v2/ratings") == (200, b"v1 /v2/ratings")
        # A backend with no endpoints is a 503 naming the service, not a crash.
        current = ServiceRoutes(Snapshot(pods=(), services=services))
        status, body = await request(port_of(wp), "/")
        assert status == 503 and b"bookinfo/reviews port 9080 has no ready endpoints" in body
    finally:
        wp.close()
        v1.close()
        v2.close()
