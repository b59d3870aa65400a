"""The waypoint on Kubernetes: its config from the API server (`waypoint --kube`).

Against the wire-level fake API server: the loopback mesh of the waypoint tests (real ztunnels,
a real Waypoint, real backends), its snapshot coming from a `KubeSource` with the waypoint's
kinds, and objects created through the API changing what the waypoint does (an HTTPRoute
routes, an AuthorizationPolicy denies, a RequestAuthentication verifies tokens against a JWKS
in a labelled ConfigMap). And the real `waypoint --kube` process: not ready and not listening
until the API server has given it a full snapshot, then serving what the API holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from certs.ca import CertificateAuthority
from mesh.config.kube import JWKS_CONFIGMAP_LABEL, WAYPOINT_KINDS, KubeSource
from mesh.config.source import ConfigStore
from tests.fakes.kube_apiserver import FakeApiServer
from tests.integration.kube.test_kube_processes import kubeconfig
from tests.integration.waypoint.test_waypoint_l7_policy import (
    ISS,
    OTHER,
    SVC_REF,
    bearer,
    jwks,
    policy,
    token,
)
from tests.integration.waypoint.waypointkit import NS, Mesh, start_mesh, stop_mesh

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
Doc = dict[str, Any]


@pytest.fixture
async def kube_mesh(
    tmp_path: Path, apiserver: FakeApiServer, api_client: k8s.ApiClient
) -> AsyncIterator[Mesh]:
    """The loopback mesh whose snapshot is whatever the KubeSource last published."""
    mesh = await start_mesh(tmp_path)
    for doc in mesh.base:
        apiserver.put(doc)
    store = ConfigStore()
    src = KubeSource(api_client, store, kinds=WAYPOINT_KINDS, debounce=0.02)
    tasks = [asyncio.create_task(src.run())]

    async def follow() -> None:
        async for snap in store.subscribe():
            mesh.snap[0] = snap

    tasks.append(asyncio.create_task(follow()))
    try:
        await asyncio.wait_for(src.ready.wait(), 30)
        mesh.src = src  # type: ignore[attr-defined]
        yield mesh
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await stop_mesh(mesh)


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Poll: a watch event reaches the snapshot within a debounce, but the machine is loaded."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_route_and_policy_created_through_the_api(
    kube_mesh: Mesh, apiserver: FakeApiServer
) -> None:
    mesh = kube_mesh
    r = await mesh.get("/v2/hello")
    assert r.status == 200  # no route yet: the Service's own pods (v1 or v2)
    apiserver.put(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                        "backendRefs": [{"name": "echo-v2", "port": 80}],
                    },
                    {"backendRefs": [{"name": "echo-v1", "port": 80}]},
                ],
            },
        }
    )

    async def routed() -> bool:
        a, b = await mesh.get("/v2/x"), await mesh.get("/other")
        return bool(a.json()["pod"] == "echo-v2" and b.json()["pod"] == "echo-v1")

    await until(routed, "the HTTPRoute from the API server to route")
    for _ in range(5):
        assert (await mesh.get("/v2/y")).json()["pod"] == "echo-v2"
        assert (await mesh.get("/z")).json()["pod"] == "echo-v1"

    apiserver.put(policy("deny-admin", "DENY", [{"to": [{"operation": {"paths": ["/admin*"]}}]}]))

    async def denied() -> bool:
        return (await mesh.get("/admin/x")).status == 403

    await until(denied, "the AuthorizationPolicy from the API server to deny")
    assert (await mesh.get("/v2/ok")).status == 200
    apiserver.delete("AuthorizationPolicy", "deny-admin", NS)

    async def allowed() -> bool:
        return (await mesh.get("/admin/x")).status == 200

    await until(allowed, "the deleted AuthorizationPolicy to stop denying")


async def test_request_authentication_with_jwks_from_a_labelled_configmap(
    kube_mesh: Mesh, apiserver: FakeApiServer
) -> None:
    mesh = kube_mesh
    uri = f"configmap://{NS}/issuer-keys/jwks.json"
    apiserver.put(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": NS},
            "spec": {"targetRefs": SVC_REF, "jwtRules": [{"issuer": ISS, "jwksUri": uri}]},
        }
    )
    apiserver.put(
        policy("need-jwt", "ALLOW", [{"from": [{"source": {"requestPrincipals": [f"{ISS}/*"]}}]}])
    )
    cm: Doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "issuer-keys", "namespace": NS},
        "data": {"jwks.json": jwks()},
    }
    # Unlabelled, the ConfigMap never reaches the waypoint: the key cannot be read, so
    # every token is refused (fail closed), never accepted unchecked.
    apiserver.put(cm)

    async def refused() -> bool:
        return (await mesh.get("/who", headers=bearer(token()))).status == 401

    await until(refused, "the RequestAuthentication to be enforced")
    src: KubeSource = mesh.src  # type: ignore[attr-defined]
    assert not list(src.objects_of("ConfigMap"))  # not even held in memory
    cm["metadata"]["labels"] = {JWKS_CONFIGMAP_LABEL: "true"}
    apiserver.put(cm)

    async def accepted() -> bool:
        return (await mesh.get("/who", headers=bearer(token()))).status == 200

    await until(accepted, "the labelled JWKS ConfigMap to verify tokens")
    r = await mesh.get("/who", headers=bearer(token(key=OTHER)))
    assert r.status == 401 and b"signature does not verify" in r.body
    assert (await mesh.get("/who")).status == 403  # no token: the ALLOW policy refuses


# -- the process ------------------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_waypoint_process_waits_for_the_api_then_serves_its_config(
    tmp_path: Path, apiserver: FakeApiServer
) -> None:
    kc = kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    CertificateAuthority.init(tmp_path / "ca")
    apiserver.put(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.9.9.9", "ports": [{"port": 80, "appProtocol": "http"}]},
        }
    )
    apiserver.missing = {"httproutes"}  # a required kind the server does not answer (yet)
    with socket.socket() as s:  # readiness needs a known port: it answers before stdout says
        s.bind(("127.0.0.1", 0))
        ready_port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--kube",
        "--kubeconfig", str(kc), "--ca-dir", str(tmp_path / "ca"),
        "--hbone-addr", "127.0.0.1:0", "--readiness-addr", f"127.0.0.1:{ready_port}",
        "--metrics-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
        "--log-level", "debug",
        env=ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        # the process is up, its watches failing on httproutes: no HBONE yet
        for _ in range(200):
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the waypoint exited"
            if "waiting for the first config snapshot" in line:
                break
        await asyncio.sleep(1.0)  # the watches keep failing on httproutes meanwhile
        assert proc.returncode is None
        status, _ = await asyncio.to_thread(_get, ready_port, "/healthz/ready")
        assert status == 503  # up, but without its routes and policies: not ready
        out = asyncio.create_task(proc.stdout.readline())
        await asyncio.sleep(0.5)
        assert not out.done(), "HBONE opened before the first snapshot"
        apiserver.missing = set()
        first = (await asyncio.wait_for(out, 60)).decode()
        assert "hbone on" in first
        lines = [first] + [
            (await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(3)
        ]
        ports = {ln.split()[2]: int(ln.split()[4]) for ln in lines}
        assert ports["readiness"] == ready_port
        status, _ = await asyncio.to_thread(_get, ready_port, "/healthz/ready")
        assert status == 200
        status, body = await asyncio.to_thread(_get, ports["admin"], "/config_dump")
        assert status == 200
        svcs = json.loads(body)["services"]
        assert [(s["namespace"], s["name"], s["cluster_ip"]) for s in svcs] == [
            ("ns", "web", "10.9.9.9")
        ]
    finally:
        proc.terminate()
        await proc.wait()


def test_kube_and_config_together_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--kube",
         "--config", str(tmp_path), "--ca-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "give --kube or --config, not both" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns",
         "--kubeconfig", str(tmp_path / "kc"), "--ca-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--kubeconfig needs --kube" in out.stderr


def test_waypoint_kinds_are_ztunnels_plus_request_authn_and_labelled_configmaps() -> None:
    from mesh.config.kube import DEFAULT_KINDS

    by = {k.kind: k for k in WAYPOINT_KINDS}
    assert {k.kind for k in DEFAULT_KINDS} <= set(by)
    assert by["RequestAuthentication"].optional
    assert by["ConfigMap"].label_selector == JWKS_CONFIGMAP_LABEL
