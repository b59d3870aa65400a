"""GRPCRoute through a real waypoint with real gRPC calls (grpcio on both ends): a split by
weight for one method, another method to one backend, header filters applied, and an
unmatched method answered as gRPC answers a missing route.

client ─► ztunnel n1 ─HBONE─► waypoint (GRPCRoute on Service grpc) ─HBONE─► ztunnel n2 ─► grpc-a|b
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.waypoint.waypointkit import GRPC_VIP, NS, Mesh

Doc = dict[str, Any]
PODS = {"grpc-a": ("127.0.0.10", "10.96.0.21"), "grpc-b": ("127.0.0.11", "10.96.0.22")}


async def start_named(name: str, ip: str) -> tuple[Any, int]:
    """A grpcio server that answers every method with its own name and the x-routed metadata
    it received, so the client sees where its call went and what the route added."""
    import grpc  # type: ignore[import-untyped]

    async def answer(req: bytes, ctx: Any) -> bytes:
        md = dict(ctx.invocation_metadata())
        return f"{name}:{md.get('x-routed', '-')}:{md.get('x-drop', '-')}".encode()

    handlers = {m: grpc.unary_unary_rpc_method_handler(answer) for m in ("Unary", "Other", "Nope")}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port(f"{ip}:0")
    await server.start()
    return server, port


def manifests(ports: dict[str, int]) -> list[Doc]:
    docs: list[Doc] = []
    for name, (ip, vip) in PODS.items():
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
                "spec": {"nodeName": "n2", "serviceAccountName": "grpc"},
                "status": {"podIP": ip},
            }
        )
        port = {"name": "grpc", "port": 50051, "targetPort": ports[name], "appProtocol": "grpc"}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"clusterIP": vip, "selector": {"app": name}, "ports": [port]},
            }
        )
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "split", "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "grpc", "port": 50051}],
                "rules": [
                    {
                        "matches": [{"method": {"service": "test.Echo", "method": "Unary"}}],
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {
                                    "set": [{"name": "x-routed", "value": "unary"}],
                                    "remove": ["x-drop"],
                                },
                            },
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "add": [{"name": "x-split", "value": "yes"}]
                                },
                            },
                        ],
                        "backendRefs": [
                            {"name": "grpc-a", "port": 50051, "weight": 3},
                            {"name": "grpc-b", "port": 50051, "weight": 1},
                        ],
                    },
                    {
                        "matches": [{"method": {"type": "RegularExpression", "method": "Oth.*"}}],
                        "backendRefs": [{"name": "grpc-b", "port": 50051}],
                    },
                ],
            },
        }
    )
    return docs


@pytest.fixture
async def routed(mesh: Mesh) -> AsyncIterator[Mesh]:
    servers = {name: await start_named(name, ip) for name, (ip, _) in PODS.items()}
    try:
        mesh.apply(manifests({n: p for n, (_, p) in servers.items()}))
        mesh.waypoint.handler.rng = random.Random(17)
        yield mesh
    finally:
        for server, _ in servers.values():
            await server.stop(None)


async def test_grpc_route_splits_one_method_by_weight(routed: Mesh) -> None:
    import grpc

    port = await routed.port_for(GRPC_VIP, 50051)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary = ch.unary_unary("/test.Echo/Unary")
        got: list[bytes] = []
        for _ in range(80):
            call = unary(b"x", metadata=(("x-drop", "1"),), timeout=10)
            got.append(await call)
            assert ("x-split", "yes") in tuple(await call.initial_metadata())
        # Every call went through the rule: its header filter set one header, removed another.
        assert set(got) <= {b"grpc-a:unary:-", b"grpc-b:unary:-"}
        a = got.count(b"grpc-a:unary:-")
        # Weights 3:1 over 80 calls: 60 expected; the bounds are > 4 standard deviations away.
        assert 44 <= a <= 76, got

        other = [await ch.unary_unary("/test.Echo/Other")(b"x", timeout=10) for _ in range(10)]
        assert other == [b"grpc-b:-:-"] * 10

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Nope")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # HTTP 404: no route


async def test_plain_http_to_a_grpc_routed_service_matches_no_grpc_route(routed: Mesh) -> None:
    """A GRPCRoute only routes gRPC: the same path without application/grpc finds no route."""
    r = await routed.get("/test.Echo/Unary", vip=GRPC_VIP, port=50051, method="POST", body=b"")
    assert r.status == 404


async def test_grpc_route_retries_on_listed_grpc_statuses(mesh: Mesh) -> None:
    """retry.codes on a GRPCRoute rule: a call that fails UNAVAILABLE (a trailers-only
    answer, HTTP 200 on the wire) is tried again and succeeds; a status not listed goes back
    to the caller after one try; attempts bound the retries."""
    import grpc

    seen: dict[str, int] = {}
    fail_first = {"Unary": 2, "Other": 1, "Nope": 99}

    def answer(method: str) -> Any:
        async def handle(req: bytes, ctx: Any) -> bytes:
            seen[method] = seen.get(method, 0) + 1
            if seen[method] <= fail_first[method]:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if method == "Other" else None
                await ctx.abort(code or grpc.StatusCode.UNAVAILABLE, f"try {seen[method]}")
            return f"ok after {seen[method]}".encode()

        return handle

    ip = PODS["grpc-a"][0]
    server = grpc.aio.server()
    handlers = {m: grpc.unary_unary_rpc_method_handler(answer(m)) for m in fail_first}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port(f"{ip}:0")
    await server.start()
    try:
        docs = [d for d in manifests({"grpc-a": port, "grpc-b": port}) if d["kind"] != "GRPCRoute"]
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GRPCRoute",
                "metadata": {"name": "retry", "namespace": NS},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "grpc", "port": 50051}],
                    "rules": [
                        {
                            "retry": {"attempts": 3, "codes": ["UNAVAILABLE", 4], "backoff": "1ms"},
                            "backendRefs": [{"name": "grpc-a", "port": 50051}],
                        }
                    ],
                },
            }
        )
        mesh.apply(docs)
        vport = await mesh.port_for(GRPC_VIP, 50051)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{vport}") as ch:
            assert await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10) == b"ok after 3"
            assert seen["Unary"] == 3
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Other")(b"x", timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert seen["Other"] == 1  # not a listed status: no retry
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Nope")(b"x", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "try 4"  # the last try's answer reaches the caller
            assert seen["Nope"] == 4  # 1 + 3 attempts
    finally:
        await server.stop(None)
