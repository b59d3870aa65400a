"""Flows recorded by two real ztunnels (real TLS, h2, sockets), read back the way
`meshctl observe` reads them: over the admin port's /flows stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mesh.config.parse import parse_objects
from mesh.flows import Flow, FlowRing, FlowStreamParams, flows_route
from mesh.observability import ObservabilityServer
from meshctl.observe.output import compact, table
from meshctl.observe.sources import AddressSource, SourceError, collect
from tests.integration.ztunnel.test_two_nodes import Lab, lab, talk
from tests.meshkit import WEB, two_nodes

__all__ = ["lab"]  # the fixture, shared with the two-node tests


@pytest.fixture
async def rings(lab: Lab) -> AsyncIterator[tuple[FlowRing, FlowRing]]:
    r1, r2 = (
        FlowRing(64, node="n1", proxy="ztunnel-n1"),
        FlowRing(64, node="n2", proxy="ztunnel-n2"),
    )
    lab.n1.flows, lab.n2.flows = r1, r2
    yield r1, r2


async def settled(ring: FlowRing, n: int) -> list[Flow]:
    for _ in range(100):  # recorded when the connection has closed on both sides
        if len(ring) >= n:
            break
        await asyncio.sleep(0.05)
    return ring.since(0)[0]


async def test_forwarded_connection_is_one_flow_at_each_end(
    lab: Lab, rings: tuple[FlowRing, FlowRing]
) -> None:
    payload = b"hello flows" * 100
    assert await talk("127.0.0.1", lab.outbound_port, payload) == payload
    (out,) = await settled(rings[0], 1)
    (inb,) = await settled(rings[1], 1)
    for f in (out, inb):
        assert f.verdict == "FORWARDED" and f.mtls and f.reporter == "ztunnel"
        assert (f.src_namespace, f.src_pod) == ("shop", "web")
        assert (f.dst_namespace, f.dst_pod, f.dst_port) == ("shop", "echo", lab.echo_port)
        assert f.bytes_sent == len(payload) and f.bytes_received == len(payload)
        assert f.duration_ms is not None and f.latency_ms is not None
        assert f.latency_ms <= f.duration_ms
    assert out.dst_service == "echo.shop" and out.node == "n1" and out.proxy == "ztunnel-n1"
    assert out.src_port is not None and out.src_port > 0  # the app's own port
    assert inb.src_identity == WEB and inb.node == "n2"
    line = compact(out)
    assert "shop/web" in line and "-> shop/echo:" in line and "FORWARDED (mTLS)" in line


async def test_denied_connection_names_the_policy(
    lab: Lab, rings: tuple[FlowRing, FlowRing]
) -> None:
    lab.reconfigure(deny=True)
    assert await talk("127.0.0.1", lab.outbound_port, b"secret") == b""
    (inb,) = await settled(rings[1], 1)
    assert inb.verdict == "DENIED" and inb.policy == "shop/no-web" and inb.bytes_sent == 0
    (out,) = await settled(rings[0], 1)
    assert out.verdict == "DENIED"  # the caller's side sees the 401
    assert "policy shop/no-web" in compact(inb)
    assert "DENIED shop/no-web" in table([inb])


async def test_plaintext_refused_under_strict_is_denied_and_not_mtls(
    lab: Lab, rings: tuple[FlowRing, FlowRing]
) -> None:
    lab.reconfigure(strict=True)
    assert await talk("127.0.0.2", lab.plaintext_port, b"plain") == b""
    (f,) = await settled(rings[1], 1)
    assert f.verdict == "DENIED" and not f.mtls and f.src_identity is None


async def test_no_route_is_a_drop_with_its_reason(
    lab: Lab, rings: tuple[FlowRing, FlowRing]
) -> None:
    docs = two_nodes(lab.echo_port)
    no_echo = [d for d in docs if not (d["kind"] == "Pod" and d["metadata"]["name"] == "echo")]
    lab.snap[0] = parse_objects(no_echo)  # the service keeps its VIP, loses its only endpoint
    assert await talk("127.0.0.1", lab.outbound_port, b"x") == b""
    (f,) = await settled(rings[0], 1)
    assert f.verdict == "DROPPED" and f.reason == "no route"


async def test_observe_reads_the_stream_with_server_side_filters(
    lab: Lab, rings: tuple[FlowRing, FlowRing]
) -> None:
    payload = b"ok"
    assert await talk("127.0.0.1", lab.outbound_port, payload) == payload
    lab.reconfigure(deny=True)
    assert await talk("127.0.0.1", lab.outbound_port, b"no") == b""
    await settled(rings[1], 2)
    async with (
        ObservabilityServer("127.0.0.1", 0, streams={"/flows": flows_route(rings[0])}) as a1,
        ObservabilityServer("127.0.0.1", 0, streams={"/flows": flows_route(rings[1])}) as a2,
    ):
        sources = [
            AddressSource("n1", host="127.0.0.1", port=a1.port),
            AddressSource("n2", host="127.0.0.1", port=a2.port),
        ]
        params = FlowStreamParams.from_query({"namespace": "shop", "verdict": "DENIED"})
        got, errors = await collect(sources, params)
        assert not errors
        assert sorted(f.node or "" for f in got) == ["n1", "n2"]
        assert all(f.verdict == "DENIED" for f in got)
        assert {f.policy for f in got} == {None, "shop/no-web"}
        bad = AddressSource("gone", host="127.0.0.1", port=1)
        with pytest.raises(SourceError):
            async for _ in bad.flows(params):
                pass
