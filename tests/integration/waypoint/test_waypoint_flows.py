"""Flows a real waypoint records per request (real HBONE, TLS, h2/HTTP/1.1 on loopback)."""

from __future__ import annotations

import asyncio

from mesh.flows import Flow, FlowRing
from meshctl.observe.output import compact
from tests.integration.waypoint.waypointkit import NS, Mesh


async def flows_of(ring: FlowRing, n: int) -> list[Flow]:
    for _ in range(100):
        if len(ring) >= n:
            break
        await asyncio.sleep(0.05)
    return ring.since(0)[0]


async def test_each_request_is_a_flow_with_its_l7_fields(mesh: Mesh) -> None:
    ring = mesh.waypoint.flows
    assert (await mesh.get("/get?x=1")).status == 200
    (f,) = await flows_of(ring, 1)
    assert f.reporter == "waypoint" and f.verdict == "FORWARDED" and f.mtls
    assert (f.method, f.path, f.status, f.protocol) == (
        "GET",
        "/get",
        200,
        "http/1.1",
    )  # no query: it may carry secrets
    assert f.dst_service == f"echo.{NS}" and f.dst_pod in ("echo-v1", "echo-v2")
    assert f.src_identity is not None and f.src_identity.startswith("spiffe://")
    assert f.bytes_received > 0 and f.duration_ms is not None
    assert f.latency_ms is not None and 0 <= f.latency_ms <= f.duration_ms  # head, then body
    d = f.to_dict()
    assert d["l7"]["method"] == "GET" and d["destination"]["service"] == f"echo.{NS}"
    assert "http-request FORWARDED (mTLS) GET /get => 200" in compact(f)


async def test_l7_denial_is_denied_with_the_policy(mesh: Mesh) -> None:
    mesh.apply(
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "no-admin", "namespace": NS},
                "spec": {
                    "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
                },
            }
        ]
    )
    assert (await mesh.get("/admin/users")).status == 403
    (f,) = await flows_of(mesh.waypoint.flows, 1)
    assert f.verdict == "DENIED" and f.policy == f"{NS}/no-admin" and f.status == 403
    assert f.dst_service == f"echo.{NS}" and f.dst_pod is None


async def test_recording_off_keeps_nothing(mesh: Mesh) -> None:
    mesh.waypoint.handler.flows = None  # what --flow-buffer-size 0 gives the handler
    assert (await mesh.get("/get")).status == 200
    await asyncio.sleep(0.1)
    assert len(mesh.waypoint.flows) == 0


async def test_overload_refusal_is_dropped_with_its_reason(mesh: Mesh) -> None:
    mesh.waypoint.inbound.active = 10**6  # as if max_connections were all taken
    try:
        r = await mesh.get("/get")
    except (OSError, ConnectionError):
        r = None
    assert r is None or r.status != 200
    f = next(f for f in await flows_of(mesh.waypoint.flows, 1) if f.verdict == "DROPPED")
    assert f.reason == "overload" and f.dst_service == f"echo.{NS}"
    mesh.waypoint.inbound.active = 0
