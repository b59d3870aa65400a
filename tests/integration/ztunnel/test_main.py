"""The ztunnel process: starts on a config and a CA, answers readiness and the config dump,
serves metrics, and refuses bad config at start with a message naming object and field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from certs.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.244.1.5}
"""


def start(tmp_path: Path, config: str, *extra: str) -> subprocess.Popen[str]:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "mesh.yaml").write_text(config)
    return subprocess.Popen(
        [sys.executable, "-m", "ztunnel.main", "--node", "n1", "--config",
         str(tmp_path / "mesh.yaml"), "--ca-dir", str(tmp_path / "ca"),
         "--hbone-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0", *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_ready_dump_and_metrics(tmp_path: Path) -> None:
    proc = start(tmp_path, CONFIG)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ports = dict(kv.split("=") for kv in line.split()[1:])
        get = lambda port, path: urllib.request.urlopen(  # noqa: E731
            f"http://127.0.0.1:{ports[port]}{path}", timeout=10
        )
        assert get("readiness", "/healthz/ready").status == 200
        dump = json.loads(get("admin", "/config_dump").read())
        assert dump["node"] == "n1"
        assert "spiffe://cluster.local/node/n1" in [c["identity"] for c in dump["certificates"]]
        assert "10.244.1.5" in json.dumps(dump)
        assert b"ambientmesh_build_info" in get("metrics", "/metrics").read()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_limits_are_flags_and_in_the_config_dump(tmp_path: Path) -> None:
    """Defaults a production node runs with, each overridable, all shown to the operator."""
    proc = start(tmp_path, CONFIG, "--max-streams", "50", "--handshake-timeout", "3")
    try:
        assert proc.stdout is not None
        ports = dict(kv.split("=") for kv in proc.stdout.readline().split()[1:])
        url = f"http://127.0.0.1:{ports['admin']}/config_dump"
        limits = json.loads(urllib.request.urlopen(url, timeout=10).read())["limits"]
        assert limits["max_streams"] == 50 and limits["handshake_timeout"] == 3.0
        assert limits["max_header_list_size"] == 64 * 1024
        assert limits["max_connections_per_peer"] == 1024 and limits["max_connections"] == 10000
        assert limits["idle_timeout"] == 300.0 and limits["max_pending_dials"] == 1024
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "ztunnel.main", "--node", "n1", "--config", "x", "--ca-dir", "y",
         "--max-streams", "0"], env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--max-streams must be >= 1" in bad.stderr


def test_bad_config_at_start_is_refused(tmp_path: Path) -> None:
    proc = start(tmp_path, CONFIG.replace("10.244.1.5", "10.244.1.500"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "Pod shop/web" in err and "status.podIP" in err


def test_bad_update_while_serving_keeps_the_last_good_snapshot(tmp_path: Path) -> None:
    """A broken edit is logged with object and field and changes nothing; the next good
    edit applies live. The process never exits on bad config once it is serving."""
    proc = start(tmp_path, CONFIG)
    try:
        assert proc.stdout is not None
        ports = dict(kv.split("=") for kv in proc.stdout.readline().split()[1:])

        def dump() -> str:
            url = f"http://127.0.0.1:{ports['admin']}/config_dump"
            return urllib.request.urlopen(url, timeout=10).read().decode()

        def eventually(cond: Callable[[], bool]) -> bool:
            for _ in range(100):
                if cond():
                    return True
                time.sleep(0.1)
            return False

        (tmp_path / "mesh.yaml").write_text(
            CONFIG.replace("10.244.1.5", "10.244.1.500")
            + "---\n" + CONFIG.split("---")[1].replace("web", "db").replace("1.5", "1.7")
        )  # fmt: skip
        time.sleep(1.5)  # three polls
        assert proc.poll() is None
        assert "10.244.1.5" in dump() and '"db"' not in dump()
        (tmp_path / "mesh.yaml").write_text(CONFIG.replace("10.244.1.5", "10.244.1.6"))
        assert eventually(lambda: "10.244.1.6" in dump())
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Pod shop/web" in err and "status.podIP" in err
