"""The HTTP/1.1 waypoint over real loopback sockets against real misbehaving backends."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mesh.config.model import (
    BackendRef,
    HTTPRoute,
    ParentRef,
    PathMatch,
    PathMatchType,
    RouteMatch,
    RouteRetry,
    RouteRule,
    RouteTimeouts,
)
from waypoint.http1 import Http1Stream
from waypoint.routing import Request, RouteTable

NS = "mesh"
Handler = Callable[[str, str], Awaitable[tuple[int, bytes]]]


async def backend(name: str, handler: Handler | None = None) -> asyncio.Server:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                method, target, _ = line.split(" ")
                status, body = (
                    (200, f"{name} {target}".encode())
                    if handler is None
                    else await handler(method, target)
                )
                w.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
                    f"x-backend: {name}\r\n\r\n".encode()
                    + body
                )
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def port(s: asyncio.Server) -> int:
    return int(s.sockets[0].getsockname()[1])


async def start_waypoint(
    table: RouteTable, backends: dict[str, asyncio.Server], **kw: object
) -> asyncio.Server:
    async def connect(ref: BackendRef | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", port(backends[ref.name if ref else "echo"])
        )

    stream = Http1Stream(lambda: table, connect, rng=random.Random(7), **kw)  # type: ignore[arg-type]
    return await asyncio.start_server(stream.serve, "127.0.0.1", 0)


async def get(wp: asyncio.Server, target: str, extra: str = "") -> tuple[int, bytes, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port(wp))
    w.write(f"GET {target} HTTP/1.1\r\nhost: echo\r\n{extra}connection: close\r\n\r\n".encode())
    data = await r.read(-1)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


def rt(*rules: RouteRule) -> RouteTable:
    return RouteTable([HTTPRoute(NS, "r", (ParentRef("Service", "echo", NS, 80),), rules=rules)])


def ref(name: str, w: int = 1) -> BackendRef:
    return BackendRef(name, NS, 80, w)


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, asyncio.Server]]:
    s = {n: await backend(n) for n in ("echo", "v1", "v2")}
    yield s
    for x in s.values():
        x.close()


async def test_routes_and_default_backend(servers: dict[str, asyncio.Server]) -> None:
    t = rt(
        RouteRule(
            matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/v2")),),
            backend_refs=(ref("v2"),),
        )
    )
    wp = await start_waypoint(t, servers)
    try:
        assert (await get(wp, "/v2/x"))[2] == b"v2 /v2/x"
        assert (await get(wp, "/other"))[2] == b"echo /other"  # no route: the Service itself
    finally:
        wp.close()


async def test_keep_alive_two_requests_one_connection(servers: dict[str, asyncio.Server]) -> None:
    wp = await start_waypoint(rt(), servers)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port(wp))
        w.write(
            b"GET /a HTTP/1.1\r\nhost: echo\r\n\r\n"
            b"GET /b HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"
        )
        data = await r.read(-1)
        w.close()
        assert data.count(b"HTTP/1.1 200") == 2 and b"echo /a" in data and b"echo /b" in data
    finally:
        wp.close()


async def test_malformed_request_is_400_and_close(servers: dict[str, asyncio.Server]) -> None:
    wp = await start_waypoint(rt(), servers)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port(wp))
        w.write(b"GARBAGE\x00\x01 nonsense\r\n\r\n")
        data = await r.read(-1)
        assert data.startswith(b"HTTP/1.1 400")
    finally:
        wp.close()


async def test_retry_503_twice_then_200() -> None:
    calls = 0

    async def flaky(method: str, target: str) -> tuple[int, bytes]:
        nonlocal calls
        calls += 1
        return (503, b"busy") if calls <= 2 else (200, b"finally")

    s = {"flaky": await backend("flaky", flaky)}
    t = rt(
        RouteRule(
            backend_refs=(ref("flaky"),), retry=RouteRetry(attempts=2, codes=(503,), backoff=0.01)
        )
    )
    wp = await start_waypoint(t, s)
    try:
        status, _, body = await get(wp, "/")
        assert (status, body, calls) == (200, b"finally", 3)
        calls = -10  # without enough retries the 503 reaches the client
        t2 = rt(
            RouteRule(
                backend_refs=(ref("flaky"),),
                retry=RouteRetry(attempts=1, codes=(503,), backoff=0.01),
            )
        )
        wp2 = await start_waypoint(t2, s)
        assert (await get(wp2, "/"))[0] == 503
        wp2.close()
    finally:
        wp.close()
        s["flaky"].close()


async def test_stalled_backend_times_out_504() -> None:
    async def stall(method: str, target: str) -> tuple[int, bytes]:
        await asyncio.sleep(5)
        return 200, b"late"

    s = {"slow": await backend("slow", stall)}
    t = rt(
        RouteRule(
            backend_refs=(ref("slow"),), timeouts=RouteTimeouts(request=0.3, backend_request=0.1)
        )
    )
    wp = await start_waypoint(t, s)
    try:
        status, _, _ = await get(wp, "/")
        assert status == 504
    finally:
        wp.close()
        s["slow"].close()


async def test_l7_deny_is_403_with_body(servers: dict[str, asyncio.Server]) -> None:
    def authz(req: Request) -> str | None:
        return "mesh/deny-delete" if req.path.startswith("/admin") else None

    wp = await start_waypoint(rt(), servers, authorize=authz)
    try:
        status, _, body = await get(wp, "/admin")
        assert status == 403 and b"RBAC: access denied" in body and b"mesh/deny-delete" in body
        assert (await get(wp, "/ok"))[0] == 200
    finally:
        wp.close()


async def test_weighted_split_through_proxy(servers: dict[str, asyncio.Server]) -> None:
    wp = await start_waypoint(rt(RouteRule(backend_refs=(ref("v1", 80), ref("v2", 20)))), servers)
    try:
        seen = {"v1": 0, "v2": 0}
        for _ in range(200):
            body = (await get(wp, "/"))[2]
            seen[body.split(b" ")[0].decode()] += 1
        assert 120 <= seen["v1"] <= 190 and seen["v2"] > 10
    finally:
        wp.close()


async def test_upstream_connections_are_pooled() -> None:
    accepted = 0

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    s = {"echo": await asyncio.start_server(serve, "127.0.0.1", 0)}
    wp = await start_waypoint(rt(), s)
    try:
        for _ in range(5):
            assert (await get(wp, "/"))[0] == 200
        assert accepted == 1
    finally:
        wp.close()
        s["echo"].close()


async def test_chunked_request_body_reaches_backend_and_mirror_is_owned() -> None:
    from mesh.config.model import FilterType, RequestMirror, RouteFilter

    bodies: dict[str, bytes] = {}
    mirrored = asyncio.Event()

    async def body_server(name: str) -> asyncio.Server:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                head = await r.readuntil(b"\r\n\r\n")
                cl = next(
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length")
                )
                bodies[name] = await r.readexactly(cl)
                if name == "mirror":
                    mirrored.set()
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await w.drain()
            finally:
                w.close()

        return await asyncio.start_server(serve, "127.0.0.1", 0)

    s = {"echo": await body_server("main"), "mirror": await body_server("mirror")}
    mirror = RouteFilter(FilterType.REQUEST_MIRROR, request_mirror=RequestMirror(ref("mirror")))
    wp = await start_waypoint(rt(RouteRule(filters=(mirror,), backend_refs=(ref("echo"),))), s)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port(wp))
        w.write(
            b"POST /up HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        data = await r.read(-1)
        w.close()
        assert data.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(mirrored.wait(), 5)
        assert bodies == {"main": b"hello world", "mirror": b"hello world"}
    finally:
        wp.close()
        for x in s.values():
            x.close()


async def test_redirect_and_response_header_modifier(servers: dict[str, asyncio.Server]) -> None:
    from mesh.config.model import FilterType, HeaderModifier, RequestRedirect, RouteFilter

    redirect = RouteFilter(
        FilterType.REQUEST_REDIRECT,
        request_redirect=RequestRedirect(hostname="example.org", status_code=301),
    )
    resp_mod = RouteFilter(
        FilterType.RESPONSE_HEADER_MODIFIER,
        response_header_modifier=HeaderModifier(
            set=(("x-backend", "hidden"),), add=(("x-added", "1"),)
        ),
    )
    t = rt(
        RouteRule(
            matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/old")),),
            filters=(redirect,),
        ),
        RouteRule(filters=(resp_mod,), backend_refs=(ref("v1"),)),
    )
    wp = await start_waypoint(t, servers)
    try:
        status, head, _ = await get(wp, "/old/page")
        assert status == 301 and b"location: http://example.org/old/page" in head
        status, head, body = await get(wp, "/new")
        assert status == 200 and body == b"v1 /new"
        assert (
            b"x-backend: hidden" in head and b"x-added: 1" in head and b"x-backend: v1" not in head
        )
    finally:
        wp.close()


async def test_rewrite_path_reaches_backend(servers: dict[str, asyncio.Server]) -> None:
    from mesh.config.model import (
        FilterType,
        PathModifier,
        PathModifierType,
        RouteFilter,
        URLRewrite,
    )

    rw = RouteFilter(
        FilterType.URL_REWRITE,
        url_rewrite=URLRewrite(path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/one")),
    )
    t = rt(
        RouteRule(
            matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, "/prefix/one")),),
            filters=(rw,),
            backend_refs=(ref("v1"),),
        )
    )
    wp = await start_waypoint(t, servers)
    try:
        assert (await get(wp, "/prefix/one/two?x=1"))[2] == b"v1 /one/two?x=1"
    finally:
        wp.close()
