"""KubeSource against the wire-level fake API server, driven by the real kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s

from mesh.config.kube import KubeSource
from mesh.config.snapshot import Snapshot
from mesh.config.source import ConfigStore
from tests.fakes.kube_apiserver import FakeApiServer

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "kinds.yaml"


def example_objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLES.read_text()) if d]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for d in example_objects():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return copy.deepcopy(d)
    raise KeyError((kind, name))


@asynccontextmanager
async def running(source: KubeSource) -> AsyncIterator[KubeSource]:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run())
        try:
            yield source
        finally:
            task.cancel()


async def wait_for(
    store: ConfigStore, pred: Callable[[Snapshot], bool], wait: float = 10.0
) -> Snapshot:
    async def loop() -> Snapshot:
        if pred(store.current):
            return store.current
        async for snap in store.subscribe():
            if pred(snap):
                return snap
        raise AssertionError("unreachable")

    try:
        return await asyncio.wait_for(loop(), wait)
    except TimeoutError:
        raise AssertionError(f"condition not met; last snapshot: {store.current}") from None


def make_source(api: k8s.ApiClient, store: ConfigStore, **kw: Any) -> KubeSource:
    kw.setdefault("debounce", 0.02)
    kw.setdefault("backoff_base", 0.02)
    kw.setdefault("backoff_cap", 0.2)
    return KubeSource(api, store, **kw)


def seed(apiserver: FakeApiServer) -> None:
    for obj in example_objects():
        apiserver.put(obj)


def pod_ips(s: Snapshot) -> set[str]:
    return {p.ip for p in s.pods if p.ip}


async def test_every_kind_lists_then_adds_updates_and_deletes(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        s = await wait_for(store, lambda s: s.version > 0)
        assert [n.name for n in s.namespaces] == ["shop"]
        assert [n.name for n in s.nodes] == ["node1"]
        assert pod_ips(s) == {"10.77.1.5", "10.77.1.9"}
        assert [x.name for x in s.services] == ["web"]
        assert [w.name for w in s.waypoints] == ["waypoint"]
        assert [r.name for r in s.http_routes] == ["web"]
        assert {p.name for p in s.authorization_policies} == {"web-allow", "waypoint-l7"}
        assert [p.name for p in s.peer_authentications] == ["default"]
        assert src.ready.is_set()

        # updates, one per kind
        ns = by_kind("Namespace", "shop")
        ns["metadata"]["labels"]["team"] = "a"
        apiserver.put(ns)
        node = by_kind("Node", "node1")
        node["status"]["addresses"][0]["address"] = "10.77.0.2"
        apiserver.put(node)
        pod = by_kind("Pod", "web-1")
        pod["status"]["podIP"] = "10.77.1.6"
        apiserver.put(pod)
        svc = by_kind("Service", "web")
        svc["spec"]["clusterIP"] = "10.96.0.11"
        apiserver.put(svc)
        gw = by_kind("Gateway", "waypoint")
        gw["spec"]["listeners"][0]["port"] = 15009
        apiserver.put(gw)
        route = by_kind("HTTPRoute", "web")
        route["spec"]["rules"][0]["backendRefs"][1]["weight"] = 30
        apiserver.put(route)
        ap = by_kind("AuthorizationPolicy", "web-allow")
        ap["spec"]["action"] = "DENY"
        apiserver.put(ap)
        pa = by_kind("PeerAuthentication", "default")
        pa["spec"]["mtls"]["mode"] = "PERMISSIVE"
        apiserver.put(pa)

        def updated(s: Snapshot) -> bool:
            n = s.namespace("shop")
            nd = s.node("node1")
            sv = s.service("shop", "web")
            return (
                n is not None
                and n.labels.get("team") == "a"
                and nd is not None
                and nd.address == "10.77.0.2"
                and pod_ips(s) == {"10.77.1.6", "10.77.1.9"}
                and sv is not None
                and sv.cluster_ip == "10.96.0.11"
                and [w.port for w in s.waypoints] == [15009]
                and [b.weight for b in s.http_routes[0].rules[0].backend_refs] == [90, 30]
                and {p.name: p.action.value for p in s.authorization_policies}["web-allow"]
                == "DENY"
                and [p.mode.value for p in s.peer_authentications] == ["PERMISSIVE"]
            )

        await wait_for(store, updated)

        # deletes, one per kind
        for kind, name, ns_ in [
            ("Node", "node1", ""),
            ("Pod", "web-1", "shop"),
            ("Service", "web", "shop"),
            ("Gateway", "waypoint", "shop"),
            ("HTTPRoute", "web", "shop"),
            ("AuthorizationPolicy", "web-allow", "shop"),
            ("PeerAuthentication", "default", "shop"),
            ("Namespace", "shop", ""),
        ]:
            assert apiserver.delete(kind, name, ns_) is not None

        def deleted(s: Snapshot) -> bool:
            return (
                not s.namespaces
                and not s.nodes
                and pod_ips(s) == {"10.77.1.9"}
                and not s.services
                and not s.waypoints
                and not s.http_routes
                and [p.name for p in s.authorization_policies] == ["waypoint-l7"]
                and not s.peer_authentications
            )

        await wait_for(store, deleted)
        assert all(n == 1 for n in src.relists.values()), src.relists


async def test_dropped_watch_resumes_from_last_resource_version(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        await wait_for(store, lambda s: s.version > 0)
        last_rv = src.resource_versions["Pod"]
        watches_before = apiserver.watch_count
        apiserver.drop_watches()
        # Changes while every watch is down (no await in between: the client cannot be back).
        extra = by_kind("Pod", "web-1")
        extra["metadata"]["name"] = "web-2"
        extra["status"]["podIP"] = "10.77.1.7"
        apiserver.put(extra)
        apiserver.delete("Pod", "waypoint-1", "shop")
        await wait_for(store, lambda s: pod_ips(s) == {"10.77.1.5", "10.77.1.7"})
        # Resumed by watch from the remembered resourceVersion, not by a re-list.
        assert src.relists["Pod"] == 1
        assert apiserver.watch_count > watches_before
        assert any(
            path.startswith("/api/v1/pods?")
            and "watch=True" in path
            and f"resourceVersion={last_rv}" in path
            for _, path in apiserver.requests
        ), apiserver.requests


async def test_410_gone_relists(apiserver: FakeApiServer, api_client: k8s.ApiClient) -> None:
    seed(apiserver)
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        await wait_for(store, lambda s: s.version > 0)
        apiserver.drop_watches()
        extra = by_kind("Service", "web")
        extra["metadata"]["name"] = "api"
        extra["spec"]["clusterIP"] = "10.96.0.20"
        apiserver.put(extra)
        apiserver.delete("Service", "web", "shop")
        apiserver.compact()  # the events above are gone from history: resuming gets 410

        await wait_for(store, lambda s: [x.name for x in s.services] == ["api"])
        assert src.relists["Service"] >= 2
        assert src.resource_versions["Service"] is not None
        assert int(src.resource_versions["Service"]) >= apiserver.oldest_rv


async def test_bad_object_is_skipped_and_named_while_others_land(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    seed(apiserver)
    store = ConfigStore()
    caplog.set_level(logging.ERROR, logger="mesh.config.kube")
    async with running(make_source(api_client, store)) as src:
        await wait_for(store, lambda s: s.version > 0)
        bad = by_kind("Service", "web")
        bad["metadata"]["name"] = "broken"
        bad["spec"]["clusterIP"] = "not-an-ip"
        apiserver.put(bad)
        good = by_kind("Service", "web")
        good["metadata"]["name"] = "fine"
        good["spec"]["clusterIP"] = "10.96.0.30"
        apiserver.put(good)
        s = await wait_for(store, lambda s: s.service("shop", "fine") is not None)
        assert s.service("shop", "broken") is None
        assert s.service("shop", "web") is not None
        assert "Service shop/broken" in src.skipped
        assert any(
            "Service shop/broken" in r.getMessage() and "spec.clusterIP" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]

        # Two Services claiming one VIP: the one parse_objects names is left out, not both.
        dup = by_kind("Service", "web")
        dup["metadata"]["name"] = "zz-dup"
        apiserver.put(dup)
        apiserver.put(
            {
                **good,
                "metadata": {**good["metadata"], "name": "later"},
                "spec": {**good["spec"], "clusterIP": "10.96.0.31"},
            }
        )
        s = await wait_for(store, lambda s: s.service("shop", "later") is not None)
        assert s.service("shop", "web") is not None
        assert s.service("shop", "zz-dup") is None
        assert "Service shop/zz-dup" in src.skipped


async def test_nothing_published_until_every_kind_listed(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    apiserver.missing.add("authorizationpolicies")  # CRD not installed yet
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        await asyncio.sleep(0.5)
        assert store.current.version == 0, "published without the AuthorizationPolicies"
        assert not src.ready.is_set()
        assert "Pod" in src._synced
        apiserver.missing.clear()
        s = await wait_for(store, lambda s: s.version > 0)
        assert len(s.authorization_policies) == 2


async def test_bookmark_advances_resource_version(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        await wait_for(store, lambda s: s.version > 0)
        apiserver.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
        await wait_for(store, lambda s: s.namespace("other") is not None)
        assert src.resource_versions["Pod"] != str(apiserver.rv)
        apiserver.bookmark()
        for _ in range(200):
            if src.resource_versions["Pod"] == str(apiserver.rv):
                break
            await asyncio.sleep(0.01)
        assert src.resource_versions["Pod"] == str(apiserver.rv)


async def test_local_pods_only_uses_server_side_field_selector(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    remote = by_kind("Pod", "web-1")
    remote["metadata"]["name"] = "remote"
    remote["spec"]["nodeName"] = "node2"
    remote["status"]["podIP"] = "10.77.2.5"
    apiserver.put(remote)
    store = ConfigStore()
    async with running(make_source(api_client, store, node_name="node1", local_pods_only=True)):
        s = await wait_for(store, lambda s: s.version > 0)
        assert pod_ips(s) == {"10.77.1.5", "10.77.1.9"}
        local = by_kind("Pod", "web-1")
        local["metadata"]["name"] = "web-3"
        local["status"]["podIP"] = "10.77.1.33"
        apiserver.put(local)
        moved = copy.deepcopy(remote)
        moved["metadata"]["name"] = "remote-2"
        moved["status"]["podIP"] = "10.77.2.6"
        apiserver.put(moved)
        await wait_for(store, lambda s: "10.77.1.33" in pod_ips(s))
        assert "10.77.2.6" not in pod_ips(store.current)
    assert all(
        "fieldSelector=spec.nodeName%3Dnode1" in path
        for _, path in apiserver.requests
        if path.startswith("/api/v1/pods")
    )


async def test_finished_pods_do_not_claim_their_old_ip(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    done = by_kind("Pod", "web-1")
    done["metadata"]["name"] = "job-done"
    done["status"]["phase"] = "Succeeded"  # its IP 10.77.1.5 now belongs to web-1
    apiserver.put(done)
    store = ConfigStore()
    async with running(make_source(api_client, store)) as src:
        s = await wait_for(store, lambda s: s.version > 0)
        pod = s.pod_by_ip("10.77.1.5")
        assert pod is not None and pod.name == "web-1"
        assert not src.skipped


def grpc_route(name: str = "web-grpc", weight: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {
                    "matches": [{"method": {"service": "shop.Cart", "method": "Add"}}],
                    "backendRefs": [{"name": "web", "port": 80, "weight": weight}],
                }
            ],
        },
    }


def grpc_routes(s: Snapshot) -> dict[str, int]:
    """name -> the first backend's weight, for the GRPCRoutes in a snapshot."""
    return {
        r.name: r.rules[0].backend_refs[0].weight for r in s.http_routes if r.kind == "GRPCRoute"
    }


async def test_grpcroute_is_listed_and_watched(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    apiserver.put(grpc_route())
    store = ConfigStore()
    async with running(make_source(api_client, store)):
        s = await wait_for(store, lambda s: s.version > 0)
        assert grpc_routes(s) == {"web-grpc": 1}
        assert [r.name for r in s.http_routes if r.kind == "HTTPRoute"] == ["web"]
        apiserver.put(grpc_route(weight=7))
        await wait_for(store, lambda s: grpc_routes(s) == {"web-grpc": 7})
        apiserver.delete("GRPCRoute", "web-grpc", "shop")
        await wait_for(store, lambda s: grpc_routes(s) == {})
    assert any("grpcroutes" in path for _, path in apiserver.requests)


async def test_cluster_without_grpcroute_crd_still_publishes_the_rest(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """No GRPCRoute CRD: one clear warning, every other kind lands and keeps being watched,
    and GRPCRoutes arrive once the CRD does; a CRD removed later empties them again."""
    seed(apiserver)
    apiserver.missing.add("grpcroutes")
    store = ConfigStore()
    caplog.set_level(logging.INFO, logger="mesh.config.kube")
    async with running(make_source(api_client, store, missing_recheck=0.1)) as src:
        s = await wait_for(store, lambda s: s.version > 0)
        assert [r.name for r in s.http_routes] == ["web"] and grpc_routes(s) == {}
        assert src.ready.is_set() and src.missing == {"GRPCRoute"}
        apiserver.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
        await wait_for(store, lambda s: s.namespace("other") is not None)
        await asyncio.sleep(0.5)  # several rechecks, all 404
        warned = [r for r in caplog.records if "does not serve grpcroutes" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in warned]
        assert "GRPCRoute CRD installed?" in warned[0].getMessage()

        apiserver.missing.clear()  # the CRD gets installed
        apiserver.put(grpc_route())
        await wait_for(store, lambda s: grpc_routes(s) == {"web-grpc": 1})
        assert src.missing == set()
        assert any("serves grpcroutes" in r.getMessage() for r in caplog.records)

        apiserver.missing.add("grpcroutes")  # and removed again: the next watch gets 404
        apiserver.drop_watches()
        s = await wait_for(store, lambda s: grpc_routes(s) == {})
        assert [r.name for r in s.http_routes] == ["web"]


def network_policy(port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-in", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}],
        },
    }


CNP: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "web-mtls", "namespace": "shop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"authentication": {"mode": "required"}}],
    },
}


def np_ports(s: Snapshot) -> dict[str, list[int | None]]:
    """name -> the ports of its first ingress rule, for the NetworkPolicies in a snapshot."""
    return {
        p.name: [port.port for port in p.ingress[0].ports] for p in s.network_policies if p.ingress
    }


async def test_network_policy_added_changed_deleted_through_the_api(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> None:
    seed(apiserver)
    store = ConfigStore()
    async with running(make_source(api_client, store)):
        s = await wait_for(store, lambda s: s.version > 0)
        assert s.network_policies == ()
        apiserver.put(network_policy())
        await wait_for(store, lambda s: np_ports(s) == {"web-in": [8080]})
        apiserver.put(network_policy(port=9090))
        await wait_for(store, lambda s: np_ports(s) == {"web-in": [9090]})
        apiserver.put(CNP)
        s = await wait_for(store, lambda s: [p.name for p in s.cilium_policies] == ["web-mtls"])
        assert s.cilium_policies[0].ingress is not None
        assert s.cilium_policies[0].ingress[0].auth_required
        apiserver.delete("NetworkPolicy", "web-in", "shop")
        apiserver.delete("CiliumNetworkPolicy", "web-mtls", "shop")
        await wait_for(store, lambda s: not s.network_policies and not s.cilium_policies)
    paths = [path for _, path in apiserver.requests]
    assert any("/apis/networking.k8s.io/v1/networkpolicies" in p for p in paths)
    assert any("/apis/cilium.io/v2/ciliumnetworkpolicies" in p for p in paths)


async def test_cluster_without_cilium_crd_still_publishes_network_policy(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """No Cilium: the CNP list 404s. One warning, no error loop; NetworkPolicy still lands."""
    seed(apiserver)
    apiserver.missing.add("ciliumnetworkpolicies")
    apiserver.put(network_policy())
    store = ConfigStore()
    caplog.set_level(logging.INFO, logger="mesh.config.kube")
    async with running(make_source(api_client, store, missing_recheck=0.1)) as src:
        s = await wait_for(store, lambda s: s.version > 0)
        assert np_ports(s) == {"web-in": [8080]} and s.cilium_policies == ()
        assert src.missing == {"CiliumNetworkPolicy"}
        await asyncio.sleep(0.5)  # several rechecks, all 404
        msgs = [r.getMessage() for r in caplog.records]
        assert len([m for m in msgs if "does not serve ciliumnetworkpolicies" in m]) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not [m for m in msgs if "watch ciliumnetworkpolicies broken" in m]
