"""`meshctl observe --kube`: every ztunnel and waypoint pod's flows, fanned in through the API
server's pods/proxy subresource (the wire-level fake API server, a real kubernetes_asyncio
client, real admin servers streaming /flows)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kubernetes_asyncio import client as k8s

from mesh.flows import Flow, FlowRing, FlowStreamParams, flows_route
from mesh.observability import ObservabilityServer
from meshctl.observe.cli import observe_flows
from meshctl.observe.sources import KubeSource, kube_sources
from tests.fakes.kube_apiserver import FakeApiServer


def pod(name: str, ns: str, labels: dict[str, str], node: str = "n1") -> dict[str, Any]:
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }  # fmt: skip


def flow(verdict: str, src: str, policy: str | None = None) -> Flow:
    return Flow(
        time=time.time(), verdict=verdict, src_namespace="default", src_pod=src,
        dst_namespace="default", dst_pod="httpbin-1", dst_service="httpbin.default",
        policy=policy, mtls=True,
    )  # fmt: skip


async def test_flows_from_every_proxy_pod_through_the_api_server(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    zt, wp = FlowRing(16, node="n1"), FlowRing(16, proxy="waypoint-default")
    zt.record(flow("FORWARDED", "sleep-1"))
    zt.record(flow("DENIED", "sleep-2", "default/deny-sleep"))
    wp.record(flow("DENIED", "curl-1", "default/no-admin"))
    async with (
        ObservabilityServer("127.0.0.1", 0, streams={"/flows": flows_route(zt)}) as a1,
        ObservabilityServer("127.0.0.1", 0, streams={"/flows": flows_route(wp)}) as a2,
    ):
        zlabels = {"app.kubernetes.io/name": "ztunnel"}
        apiserver.put(pod("ztunnel-abc", "ambientmesh-system", zlabels))
        apiserver.put(
            pod("waypoint-7d9f", "default", {"gateway.networking.k8s.io/gateway-name": "waypoint"})
        )
        apiserver.put(pod("sleep-1", "default", {"app": "sleep"}))  # not a proxy
        sources = await kube_sources(api_client, 0)
        assert [s.name for s in sources] == ["waypoint default/waypoint-7d9f", "ztunnel-n1"]
        # each pod's admin port differs here (one loopback): point each at its own server
        for s in sources:
            assert isinstance(s, KubeSource)
            s.port = a1.port if s.name.startswith("ztunnel") else a2.port
        params = FlowStreamParams.from_query({"verdict": "DENIED"})
        got, answered = await observe_flows(sources, params)
        assert answered == 2
        assert sorted(f.policy or "" for f in got) == ["default/deny-sleep", "default/no-admin"]
        assert any("/pods/ztunnel-abc:" in path for _, path in apiserver.requests)

        # following through the proxy: a flow recorded later arrives
        follow = FlowStreamParams.from_query({"follow": "1", "from_pod": "late"})
        zsrc = next(s for s in sources if s.name.startswith("ztunnel"))
        assert isinstance(zsrc, KubeSource)
        it = aiter(zsrc.flows(follow))
        nxt = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.3)
        zt.record(flow("FORWARDED", "late-1"))
        f = await asyncio.wait_for(nxt, 10)
        assert f.src_pod == "late-1"
        await it.aclose()  # type: ignore[attr-defined]

        # the proxy is gone: reported by name, not fatal
        bad: list[str] = []
        zsrc.port = 1  # nothing listens there: the API server answers 503
        got, answered = await observe_flows([zsrc], params, bad.append)
        assert answered == 0 and bad and "ztunnel-n1" in bad[-1]
