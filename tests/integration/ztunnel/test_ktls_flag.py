"""`ztunnel --ktls auto|on|off` on a kernel without kTLS (this machine's): `auto` falls back
and says why in the config dump and the metric; `on` refuses to start. tests/ktls covers
the kernel that has it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh import ktls

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(ktls.probe().available, reason="this kernel has kTLS")


def start(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "mesh.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    return subprocess.Popen(
        [sys.executable, "-m", "ztunnel.main", "--node", "n1", "--config",
         str(tmp_path / "mesh.yaml"), "--ca-dir", str(tmp_path / "ca"), "--ktls", mode,
         "--hbone-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_on_without_kernel_support_refuses_to_start(tmp_path: Path) -> None:
    proc = start(tmp_path, "on")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "ktls: on, but this kernel cannot: kernel has no TLS ULP" in err


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_auto_and_off_run_user_space_tls_and_say_so(tmp_path: Path, mode: str) -> None:
    proc = start(tmp_path, mode)
    try:
        assert proc.stdout is not None
        ports = dict(kv.split("=") for kv in proc.stdout.readline().split()[1:])
        url = f"http://127.0.0.1:{ports['admin']}/config_dump"
        dump = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert dump["ktls"]["mode"] == mode
        assert dump["ktls"]["enabled"] is False
        assert "no TLS ULP" in dump["ktls"]["kernel"]["reason"]
        url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        assert b"ambientmesh_ktls_enabled 0.0" in urllib.request.urlopen(url, timeout=10).read()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
