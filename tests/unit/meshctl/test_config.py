"""`meshctl config validate` as an operator runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "meshctl.cli", "config", "validate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_validate_ok() -> None:
    out = run(str(ROOT / "deploy" / "examples" / "kinds.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "ok: 10 objects\n"


def test_validate_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {clusterIP: 10.1.1.1, ports: [{port: 0}, {port: 80, targetPort: 99999}]}\n"
    )
    out = run(str(tmp_path))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "Service default/web: spec.ports[0].port must be between 1 and 65535",
        "Service default/web: spec.ports[1].targetPort must be between 1 and 65535",
    ]
