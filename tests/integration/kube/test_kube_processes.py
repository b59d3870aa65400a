"""The Kubernetes path end to end, as the manifests run it: the CA process with the
TokenReview authorizer and a ztunnel process with `--kube --ca --ca-token`, both against the
wire-level fake API server through kubeconfigs. ztunnel starts with no certificate at all,
obtains its node identity from the CA by token, serves, and sees a pod added to the API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from certs.ca import CertificateAuthority
from certs.kube_auth import DEFAULT_AUDIENCE
from tests.fakes.kube_apiserver import FakeApiServer, TokenIdentity

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
ZT = "system:serviceaccount:ambientmesh-system:ztunnel"


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "api-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))  # fmt: skip
    return path


def pod(name: str, node: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": []},
        "status": {"phase": "Running", "podIP": ip},
    }  # fmt: skip


async def start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("ready"):
        assert proc.stderr is not None
        raise AssertionError(f"{args[0]} did not start: {(await proc.stderr.read()).decode()}")
    return proc, line


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.terminate()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    return await proc.wait(), err


async def test_ztunnel_with_a_token_only_runs_on_kubernetes(
    apiserver: FakeApiServer, tmp_path: Path
) -> None:
    apiserver.put({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "shop",
                                "labels": {"istio.io/dataplane-mode": "ambient"}}})  # fmt: skip
    apiserver.put(pod("web", "node1", "10.244.1.5"))
    apiserver.tokens["zt-node1"] = TokenIdentity(
        ZT, extra={"authentication.kubernetes.io/node-name": ["node1"]},
        audiences=(DEFAULT_AUDIENCE,),
    )  # fmt: skip
    kc = kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    ca = CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "root-cert.pem").write_bytes(ca.bundle_pem)
    (tmp_path / "token").write_text("zt-node1")

    ca_proc, line = await start(
        "certs.service", "--ca-dir", str(tmp_path / "ca"), "--listen", "127.0.0.1:0",
        "--authorizer", "kubernetes", "--kubeconfig", str(kc),
    )  # fmt: skip
    ca_port = line.split("=")[1].strip()
    zt = None
    try:
        zt, line = await start(
            "ztunnel", "--node", "node1", "--kube", "--kubeconfig", str(kc),
            "--ca", f"127.0.0.1:{ca_port}", "--ca-bundle", str(tmp_path / "root-cert.pem"),
            "--ca-token", str(tmp_path / "token"), "--hbone-addr", "127.0.0.1:0",
            "--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
            "--readiness-addr", "127.0.0.1:0",
        )  # fmt: skip
        ports = dict(kv.split("=") for kv in line.split()[1:])

        def dump() -> dict[str, Any]:
            url = f"http://127.0.0.1:{ports['admin']}/config_dump"
            return dict(json.loads(urllib.request.urlopen(url, timeout=10).read()))

        d = await asyncio.to_thread(dump)
        node_cert = [c for c in d["certificates"] if c["identity"].endswith("/node/node1")]
        assert node_cert, d["certificates"]  # signed by the CA for the token's node
        assert "10.244.1.5" in json.dumps(d)
        apiserver.put(pod("api", "node1", "10.244.1.6"))  # the watch brings it in
        for _ in range(50):
            if "10.244.1.6" in json.dumps(await asyncio.to_thread(dump)):
                break
            await asyncio.sleep(0.1)
        assert "10.244.1.6" in json.dumps(await asyncio.to_thread(dump))
        reviews = [p for _, p in apiserver.requests if p.endswith("/tokenreviews")]
        assert reviews  # the CA asked the API server about ztunnel's token
    finally:
        if zt is not None:
            code, err = await stop(zt)
            assert code == 0, err
        code, err = await stop(ca_proc)
        assert code == 0, err


async def test_waypoint_apply_writes_the_gateway_to_the_api(
    apiserver: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path / "kubeconfig", apiserver.url)

    async def apply() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl", "waypoint", "apply", "-n", "shop", "--kube",
            "--kubeconfig", str(kc), env=ENV, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return out.decode()

    assert "created" in await apply()
    gw = apiserver.get("Gateway", "waypoint", "shop")
    assert gw is not None and gw["spec"]["gatewayClassName"] == "waypoint"
    assert "updated" in await apply()  # idempotent
