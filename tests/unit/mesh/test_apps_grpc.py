"""The lab's gRPC apps (`mesh.apps.grpc_echo`, `mesh.apps.grpc_client`) on loopback: the demo
reads a GRPCRoute split from exactly these JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc")

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), POD_NAME="ratings-v9", POD_NAMESPACE="demo")


def test_client_calls_the_echo_and_reports_each_call() -> None:
    srv = subprocess.Popen(
        [sys.executable, "-m", "mesh.apps.grpc_echo", "--host", "127.0.0.1", "--port", "0"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert "grpc echo listening on 127.0.0.1:" in line
        port = line.rsplit(":", 1)[1].strip()
        out = subprocess.run(
            [sys.executable, "-m", "mesh.apps.grpc_client", f"127.0.0.1:{port}",
             "--method", "/demo.Ratings/Get", "--count", "3", "--timeout", "10"],
            env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        calls = [json.loads(x) for x in out.stdout.splitlines()]
        assert [c["ok"] for c in calls] == [True] * 3
        assert calls[0]["body"]["pod"] == "ratings-v9"
        assert calls[0]["body"]["method"] == "/demo.Ratings/Get"
    finally:
        srv.terminate()
        srv.wait(10)


def test_client_reports_failures_and_exits_nonzero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.apps.grpc_client", "127.0.0.1:1", "--timeout", "2"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    [call] = [json.loads(x) for x in out.stdout.splitlines()]
    assert call["ok"] is False and call["error"].startswith("UNAVAILABLE")


@pytest.mark.parametrize("args", [["nohost"], ["127.0.0.1:1", "--method", "Get"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.apps.grpc_client", *args],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "expected" in out.stderr
