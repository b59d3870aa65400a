"""The waypoint process's flow flags: /flows on the admin port, the read-only --flows-addr
listener, --flow-buffer-size checked at start."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from certs.ca import CertificateAuthority
from tests.integration.waypoint.test_waypoint_main import CONFIG, ENV
from tests.meshkit import free_port


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flows_on_admin_and_flows_port(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG.format())
    fport = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--config", str(cfg),
         "--ca-dir", str(tmp_path / "ca"), "--hbone-addr", "127.0.0.9:0",
         "--readiness-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
         "--admin-addr", "127.0.0.1:0", "--flows-addr", f"127.0.0.1:{fport}"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        ports = {ln.split()[2]: int(ln.split()[4]) for ln in lines}
        assert ports["flows"] == fport
        assert status(ports["admin"], "/flows?last=3") == 200
        assert status(ports["admin"], "/flows?protocol=carrier-pigeon") == 400
        assert status(fport, "/flows") == 200
        assert status(fport, "/config_dump") == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_flow_buffer_size_is_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "waypoint.main", "--namespace", "ns", "--ca-dir", "/x",
         "--flow-buffer-size", "-5"],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--flow-buffer-size" in out.stderr
