"""The waypoint controller against the fake API server: Gateway → ServiceAccount, Deployment,
Service, and status on the Gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from controller.waypoint import HASH_ANNOTATION, WaypointController
from tests.fakes.kube_apiserver import FakeApiServer

IMAGE = "ghcr.io/ambientmesh/ambientmesh:test"


def gateway(
    name: str, ns: str = "shop", cls: str = "waypoint", port: int = 15008
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "gatewayClassName": cls,
            "listeners": [{"name": "mesh", "port": port, "protocol": "HBONE"}],
        },
    }


ROOT_PEM = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"


@pytest.fixture
async def controller(
    apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> AsyncIterator[WaypointController]:
    apiserver.put({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "ambientmesh-ca-root", "namespace": "ambientmesh-system"},
                   "data": {"root-cert.pem": ROOT_PEM}})  # fmt: skip
    ctl = WaypointController(api_client, image=IMAGE, resync=0.3, debounce=0.02)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ctl.run())
        try:
            yield ctl
        finally:
            task.cancel()


async def until(pred: Callable[[], Any], wait: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while loop.time() < end:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def test_gateway_becomes_deployment_service_and_status(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    gw = apiserver.put(gateway("waypoint"))
    apiserver.put(gateway("ingress", cls="istio"))  # not ours
    dep = await until(lambda: apiserver.get("Deployment", "waypoint", "shop"))
    svc = await until(lambda: apiserver.get("Service", "waypoint", "shop"))
    sa = await until(lambda: apiserver.get("ServiceAccount", "waypoint", "shop"))
    for o in (dep, svc, sa):
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["kind"] == "Gateway" and ref["uid"] == gw["metadata"]["uid"]
        assert ref["controller"] is True
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == IMAGE and c["readinessProbe"]["httpGet"]["port"] == 15021
    assert svc["spec"]["ports"][0]["port"] == 15008
    assert svc["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}

    def status() -> dict[str, Any] | None:
        g = apiserver.get("Gateway", "waypoint", "shop")
        assert g is not None
        st: dict[str, Any] | None = g.get("status")
        return st if st and st.get("addresses") else None

    st = await until(status)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Accepted"]["status"] == "True"
    assert conds["Programmed"]["status"] == "True"
    assert conds["Programmed"]["observedGeneration"] == 1
    assert st["addresses"] == [{"type": "IPAddress", "value": svc["spec"]["clusterIP"]}]
    assert apiserver.get("Deployment", "ingress", "shop") is None
    assert controller.ready()


async def test_spec_change_updates_and_steady_state_writes_nothing(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    apiserver.put(gateway("waypoint"))
    await until(lambda: (apiserver.get("Gateway", "waypoint", "shop") or {}).get("status"))
    # Several resyncs with nothing changed: no PATCH/POST/PUT at all.
    start = controller.reconciles
    writes_before = [r for r in apiserver.requests if r[0] != "GET"]
    await until(lambda: controller.reconciles >= start + 2)
    assert [r for r in apiserver.requests if r[0] != "GET"] == writes_before

    g = apiserver.get("Gateway", "waypoint", "shop")
    assert g is not None
    g["spec"]["listeners"][0]["port"] = 15009
    g["metadata"]["generation"] = 2
    apiserver.put(g)
    svc = await until(
        lambda: (
            (s := apiserver.get("Service", "waypoint", "shop"))
            and s["spec"]["ports"][0]["port"] == 15009
            and s
        )
    )
    assert svc["metadata"]["annotations"][HASH_ANNOTATION]
    dep = apiserver.get("Deployment", "waypoint", "shop")
    assert dep is not None
    assert "0.0.0.0:15009" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    await until(
        lambda: all(
            c["observedGeneration"] == 2
            for c in (apiserver.get("Gateway", "waypoint", "shop") or {})["status"]["conditions"]
        )
    )


async def test_resync_recreates_a_deleted_deployment(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    apiserver.put(gateway("waypoint", ns="other"))
    await until(lambda: apiserver.get("Deployment", "waypoint", "other"))
    apiserver.delete("Deployment", "waypoint", "other")
    await until(lambda: apiserver.get("Deployment", "waypoint", "other"))


async def test_waypoint_gets_the_trust_bundle_and_a_token_for_the_ca(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    """A pod mounts ConfigMaps of its own namespace only: the bundle is copied beside the
    waypoint, and the Deployment points the waypoint at the CA with a projected token."""
    apiserver.put(gateway("waypoint"))
    cm = await until(lambda: apiserver.get("ConfigMap", "waypoint-ca-root", "shop"))
    assert cm["data"]["root-cert.pem"] == ROOT_PEM
    dep = await until(lambda: apiserver.get("Deployment", "waypoint", "shop"))
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--ca") + 1] == "ambientmesh-ca.ambientmesh-system.svc:15012"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["ca-root"]["configMap"]["name"] == "waypoint-ca-root"
    token = vols["ca-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "ambientmesh-ca"


async def test_missing_bundle_is_reported_not_guessed(
    apiserver: FakeApiServer, api_client: k8s.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    ctl = WaypointController(api_client, image=IMAGE, resync=0.3, debounce=0.02)
    apiserver.put(gateway("waypoint"))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ctl.run())
        try:
            await until(lambda: any("ambientmesh-ca-root" in r.message for r in caplog.records))
            assert apiserver.get("Deployment", "waypoint", "shop") is None
        finally:
            task.cancel()


async def test_waypoint_reads_its_config_from_the_api_and_serves_flows(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    apiserver.put(gateway("waypoint"))
    dep = await until(lambda: apiserver.get("Deployment", "waypoint", "shop"))
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert "--kube" in args and "--config" not in args
    assert args[args.index("--flows-addr") + 1] == "0.0.0.0:15030"
    assert {"name": "http-flows", "containerPort": 15030} in c["ports"]


async def test_cluster_role_binding_subjects_follow_the_waypoint_gateways(
    apiserver: FakeApiServer, controller: WaypointController
) -> None:
    """A cluster object cannot be owned by a namespaced Gateway: the controller keeps the
    binding's subjects equal to the waypoints that exist, adding and removing."""

    def subjects() -> list[tuple[str, str]]:
        b = apiserver.get("ClusterRoleBinding", "ambientmesh-waypoint")
        if b is None:
            return [("", "absent")]
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                "kind": "ClusterRole", "name": "ambientmesh-waypoint"}  # fmt: skip
        return [(s["namespace"], s["name"]) for s in b.get("subjects") or []]

    await until(lambda: subjects() == [])  # created, empty, before any waypoint
    apiserver.put(gateway("waypoint"))
    apiserver.put(gateway("wp2", ns="other"))
    apiserver.put(gateway("ingress", cls="istio"))  # not a waypoint: no access
    await until(lambda: subjects() == [("other", "wp2"), ("shop", "waypoint")])
    for s in apiserver.get("ClusterRoleBinding", "ambientmesh-waypoint")["subjects"]:  # type: ignore[index]
        assert s["kind"] == "ServiceAccount"
    apiserver.delete("Gateway", "waypoint", "shop")
    await until(lambda: subjects() == [("other", "wp2")])
    g = apiserver.get("Gateway", "wp2", "other")
    assert g is not None
    g["spec"]["gatewayClassName"] = "istio"  # no longer a waypoint
    apiserver.put(g)
    await until(lambda: subjects() == [])
    # steady state: resyncs with nothing changed write nothing to the binding
    start = controller.reconciles
    writes = [r for r in apiserver.requests if r[0] != "GET" and "clusterrolebindings" in r[1]]
    await until(lambda: controller.reconciles >= start + 2)
    assert [r for r in apiserver.requests
            if r[0] != "GET" and "clusterrolebindings" in r[1]] == writes  # fmt: skip
