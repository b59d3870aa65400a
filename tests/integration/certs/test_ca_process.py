"""The CA as a process (`python -m certs.service`) with a ztunnel process that authenticates
with its node certificate (`--ca --ca-bundle --node-cert`): started the way an operator or the
manifests start them, config reloaded live, a clean exit on SIGTERM, and a clear refusal of
unusable settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
POD = """
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop}}
spec: {{nodeName: {node}, serviceAccountName: {name}}}
status: {{podIP: {ip}}}
"""
NS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
"""


def py(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", *args], env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "mesh.yaml").write_text(
        NS + "---" + POD.format(name="web", node="n1", ip="10.244.1.5")
    )
    subprocess.run(
        [sys.executable, "-m", "meshctl", "ca", "issue-node", str(tmp_path / "ca"),
         "--node", "n1", "--out", str(tmp_path / "n1"), "--ttl", "8s"],
        env=ENV, check=True, capture_output=True,
    )  # fmt: skip
    return tmp_path / "ca"


@pytest.fixture
def ca_process(ca_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = py(
        "certs.service", "--ca-dir", str(ca_dir), "--listen", "127.0.0.1:0",
        "--config", str(ca_dir.parent / "mesh.yaml"), "--readiness-addr", "127.0.0.1:0",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready ca="), proc.stderr.read() if proc.stderr else line
        yield proc, int(line.split("=")[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ztunnel_renews_its_node_certificate_through_the_ca_process(
    ca_dir: Path, ca_process: tuple[subprocess.Popen[str], int]
) -> None:
    ca, port = ca_process
    tmp = ca_dir.parent
    (tmp / "bundle.pem").write_bytes(CertificateAuthority.load(ca_dir).bundle_pem)
    zt = py(
        "ztunnel", "--node", "n1", "--config", str(tmp / "mesh.yaml"),
        "--ca", f"127.0.0.1:{port}", "--ca-bundle", str(tmp / "bundle.pem"),
        "--node-cert", str(tmp / "n1"), "--hbone-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
        "--readiness-addr", "127.0.0.1:0",
    )  # fmt: skip
    try:
        assert zt.stdout is not None
        ports = dict(kv.split("=") for kv in zt.stdout.readline().split()[1:])
        assert "admin" in ports, zt.stderr.read() if zt.stderr else ""

        def certificates() -> dict[str, str]:
            url = f"http://127.0.0.1:{ports['admin']}/config_dump"
            dump = json.loads(urllib.request.urlopen(url, timeout=10).read())
            return {c["identity"]: c["serial"] for c in dump["certificates"]}

        first = certificates()["spiffe://cluster.local/node/n1"]
        # the node certificate lives 8 s: at half life ztunnel renews it through the CA process
        for _ in range(100):
            if certificates()["spiffe://cluster.local/node/n1"] != first:
                break
            time.sleep(0.1)
        assert certificates()["spiffe://cluster.local/node/n1"] != first
    finally:
        code, err = stop(zt)
    assert code == 0, err
    code, err = stop(ca)
    assert code == 0, err
    assert "CA stopping" in err


def test_config_edits_apply_live_in_the_ca(
    ca_dir: Path, ca_process: tuple[subprocess.Popen[str], int]
) -> None:
    import asyncio

    from mesh.identity.caclient import CaClient, CaError
    from mesh.identity.spiffe import node_id

    _, port = ca_process
    ca = CertificateAuthority.load(ca_dir)
    client = CaClient(("127.0.0.1", port), ca.issue(node_id("cluster.local", "n1")), ca.bundle_pem)
    db = "spiffe://cluster.local/ns/shop/sa/db"
    with pytest.raises(CaError):
        asyncio.run(client.sign(db))  # no db pod on n1 yet
    (ca_dir.parent / "mesh.yaml").write_text(
        NS + "---" + POD.format(name="web", node="n1", ip="10.244.1.5")
        + "---" + POD.format(name="db", node="n1", ip="10.244.1.6")
    )  # fmt: skip
    for _ in range(50):
        try:
            assert asyncio.run(client.sign(db)).identity == db
            break
        except CaError:
            time.sleep(0.1)
    else:
        raise AssertionError("the CA never saw the new pod")


def test_unusable_settings_exit_2_with_a_reason(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca", trust_domain="example.org")
    for args, reason in (
        (["--ca-dir", str(tmp_path / "nope"), "--config", "x"], "not a CA directory"),
        (["--ca-dir", str(tmp_path / "ca")], "needs --config"),
        (["--ca-dir", str(tmp_path / "ca"), "--trust-domain", "cluster.local", "--config",
          "x"], "for example.org"),
    ):  # fmt: skip
        res = subprocess.run(
            [sys.executable, "-m", "certs.service", "--listen", "127.0.0.1:0", *args],
            env=ENV, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert reason in res.stderr
