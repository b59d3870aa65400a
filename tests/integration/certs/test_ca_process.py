"""The CA as a process in snapshot mode (`meshctl ca serve`, the single-host deployment):
readiness, a node certificate getting its pod's SVID, usage errors, SIGTERM exit 0."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from certs.service import CaClient, CaError
from certs.spiffe import node_id

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
PODS = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.244.1.5}
"""
WEB = "spiffe://cluster.local/ns/shop/sa/web"


def test_snapshot_mode_process(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "pods.yaml").write_text(PODS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl.cli", "ca", "serve", "--ca-dir", str(tmp_path / "ca"),
         "--listen", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0",
         "--config", str(tmp_path / "pods.yaml")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.stderr.read() if proc.stderr else line
        ports = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
        url = f"http://127.0.0.1:{ports['readiness']}/healthz/ready"
        assert urllib.request.urlopen(url, timeout=10).status == 200
        client = CaClient(("127.0.0.1", ports["ca"]), ca.issue(node_id("cluster.local", "n1")),
                          ca.bundle_pem)  # fmt: skip
        assert asyncio.run(client.sign(WEB)).identity == WEB
        other = CaClient(("127.0.0.1", ports["ca"]), ca.issue(node_id("cluster.local", "n2")),
                         ca.bundle_pem)  # fmt: skip
        with pytest.raises(CaError):
            asyncio.run(other.sign(WEB))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "1 issued, 1 refused" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--authorizer", "snapshot"], "needs --config"),
        (["--authorizer", "kubernetes", "--config", "x.yaml"], "--config applies to"),
        (["--authorizer", "kubernetes", "--ztunnel-service-account", "ztunnel"], "NAMESPACE/NAME"),
        (["--trust-domain", "other.org", "--config", "x.yaml"], "is for cluster.local"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "x.yaml").write_text(PODS)
    out = subprocess.run(
        [sys.executable, "-m", "certs.service", "--ca-dir", str(tmp_path / "ca"),
         "--listen", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0", *args],
        env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
