"""A node as it runs on Kubernetes, minus the cluster: the CA process (`python -m certs.service
--authorizer kubernetes`) and a ztunnel process (`--kube`, `--ca`, `--ca-token`), both against the
wire-level fake API server. The ztunnel has no certificate of its own: it gets its node identity
from the CA with its token, learns from the API that a pod runs on its node, and serves HBONE for
it. Loopback only, every port 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs.ca import CertificateAuthority
from certs.kube_auth import DEFAULT_AUDIENCE
from mesh.hbone import HboneError, HbonePool
from mesh.identity.spiffe import node_id, workload_id
from mesh.tcp import TcpEndpoint, join
from mesh.tls import client_context
from tests.fakes.kube_apiserver import FakeApiServer, TokenIdentity

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TD = "cluster.local"
ZT = "system:serviceaccount:ambientmesh-system:ztunnel"
POD_IP = "127.0.0.7"
CLIENT = workload_id(TD, "other", "client")


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            }
        )
    )
    return path


async def start(*argv: str) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=ENV, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
    except TimeoutError:
        line = b""
    if not line.startswith(b"ready "):
        proc.kill()
        err = await proc.stderr.read()
        raise AssertionError(f"{argv[1]} did not start: {line!r}\n{err.decode()[-3000:]}")
    return proc, {k: int(v) for k, v in (kv.split("=") for kv in line.decode().split()[1:])}


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        proc.kill()
        rc = await proc.wait()
    assert proc.stderr is not None
    return rc, (await proc.stderr.read()).decode()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await asyncio.to_thread(get)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    srv = await asyncio.start_server(echo, POD_IP, 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()


def cluster(api: FakeApiServer) -> None:
    amb = {"istio.io/dataplane-mode": "ambient"}
    api.put({"kind": "Namespace", "metadata": {"name": "shop", "labels": amb}})
    api.put({"kind": "Namespace", "metadata": {"name": "ambientmesh-system"}})
    api.put(
        {
            "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "podIP": POD_IP},
        }
    )
    api.tokens["zt-node1"] = TokenIdentity(
        ZT,
        extra={"authentication.kubernetes.io/node-name": ["node1"]},
        audiences=(DEFAULT_AUDIENCE,),
    )


async def test_ztunnel_with_token_serves_hbone_for_its_pod(
    apiserver: FakeApiServer, tmp_path: Path, echo_port: int
) -> None:
    cluster(apiserver)
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    kcfg = kubeconfig(tmp_path / "kubeconfig", apiserver.url)
    (tmp_path / "root-cert.pem").write_bytes(ca.bundle_pem)
    token = tmp_path / "ca-token"
    token.write_text("zt-node1\n")
    ca_proc, ca_ports = await start(
        "-m", "certs.service", "--ca-dir", str(tmp_path / "ca"), "--trust-domain", TD,
        "--listen", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0",
        "--authorizer", "kubernetes", "--kubeconfig", str(kcfg),
        "--token-audience", DEFAULT_AUDIENCE,
        "--ztunnel-service-account", "ambientmesh-system/ztunnel",
    )  # fmt: skip
    zt_proc = None
    try:
        zt_proc, zt = await start(
            "-m", "ztunnel", "--node", "node1", "--kube", "--kubeconfig", str(kcfg),
            "--trust-domain", TD, "--ca", f"127.0.0.1:{ca_ports['ca']}",
            "--ca-bundle", str(tmp_path / "root-cert.pem"), "--ca-token", str(token),
            "--hbone-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0",
        )  # fmt: skip
        assert (await http_get(zt["readiness"], "/healthz/ready"))[0] == 200
        _, raw = await http_get(zt["admin"], "/config_dump")
        dump: dict[str, Any] = json.loads(raw)
        assert node_id(TD, "node1") in [c["identity"] for c in dump["certificates"]]
        assert POD_IP in json.dumps(dump)

        # A client from elsewhere in the mesh: HBONE to the pod through this node's ztunnel,
        # which must present the node identity the CA issued it.
        pool = HbonePool(
            lambda ident: client_context(ca.issue(ident), ca.bundle_pem), trust_domain=TD
        )
        address = ("127.0.0.1", zt["hbone"])
        stream = await pool.connect(
            CLIENT, address, f"{POD_IP}:{echo_port}",
            expected_peers=frozenset({node_id(TD, "node1")}),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        ep = TcpEndpoint()
        local = await loop.create_server(lambda: ep, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", local.sockets[0].getsockname()[1])
        join(ep, stream)
        w.write(b"hello through the node")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(22), 10) == b"hello through the node"
        w.close()
        local.close()

        # A pod the API places on another node is not served, though something listens there.
        other = await asyncio.start_server(echo, "127.0.0.8", 0)
        other_port = other.sockets[0].getsockname()[1]
        apiserver.put(
            {
                "kind": "Pod",
                "metadata": {"name": "db-1", "namespace": "shop"},
                "spec": {"nodeName": "node2", "serviceAccountName": "db", "containers": []},
                "status": {"phase": "Running", "podIP": "127.0.0.8"},
            }
        )
        await asyncio.sleep(0.5)  # let the watch deliver it
        with pytest.raises(HboneError) as refused:
            await pool.connect(
                CLIENT, address, f"127.0.0.8:{other_port}",
                expected_peers=frozenset({node_id(TD, "node1")}),
            )  # fmt: skip
        assert 400 <= refused.value.status < 500
        other.close()
        pool.close()
    finally:
        if zt_proc is not None:
            rc, err = await stop(zt_proc)
            assert rc == 0, err[-3000:]
        rc, err = await stop(ca_proc)
    assert rc == 0, err[-3000:]
