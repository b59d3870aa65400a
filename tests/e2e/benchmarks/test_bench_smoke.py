"""`meshctl bench --quick --modes nomesh,ambient` end to end on a real lab, with tiny
durations: the JSON carries every measured field, and nothing of the labs is left behind
(network namespaces, cgroups, BPF pins, state, processes)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from meshctl.lab.system import netns_list

ROOT = Path(__file__).resolve().parents[3]


def test_quick_bench_measures_and_cleans_up(tmp_path: Path) -> None:
    sfx = secrets.token_hex(2)
    name = f"bs{sfx}"
    state = Path(f"/run/ambientmesh-test-{sfx}")
    cgroups = Path(f"/sys/fs/cgroup/unified/ambientmesh-test-{sfx}")
    pins = Path(f"/sys/fs/bpf/ambientmesh-test-{sfx}")
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "meshctl", "bench", "--quick", "--modes", "nomesh,ambient",
        "--duration", "0.5", "--rates", "200,0", "--densities", "2,3", "--bulk-mib", "4",
        "--repeats", "2",
        "--out", str(out), "--name", name, "--state-root", str(state),
        "--cgroup-root", str(cgroups), "--pin-root", str(pins),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        res = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "[ambient] (repeat 1/2) http/1.1" in res.stdout  # progress shown as it runs
        assert "[ambient] (repeat 2/2) http/1.1" in res.stdout
        data = json.loads((out / "results.json").read_text())
        for name_ in ("nomesh", "ambient"):
            m = data["modes"][name_]
            assert m["status"] == "ok", m
            assert {(r["protocol"], r["target_rate"]) for r in m["runs"]} >= {
                ("http/1.1", 200.0),
                ("http/1.1", 0.0),
                ("h2", 200.0),
            }
            for r in m["runs"]:
                assert r["completed"] > 0 and r["errors"] == 0, r
                # two repeats, one per fresh lab, merged: median and spread
                assert r["n_repeats"] == 2 and len(r["repeats"]) == 2, r
                assert r["spread_ms"]["p99"] >= 0
                assert all(r["latency_ms"][k] > 0 for k in ("p50", "p90", "p99", "p99.9"))
            assert m["bulk"]["ok"] and m["bulk"]["mib_per_s"] > 0
            assert m["verified"]["ok"]
        amb = data["modes"]["ambient"]
        assert amb["verified"]["ztunnel_mtls_connections"] > 0  # it really went through HBONE
        assert amb["cpu"]["seconds"] > 0 and amb["cpu"]["per_1k_requests"] > 0
        assert all(r["mesh_cpu_s"] >= 0 for r in amb["runs"])
        for d in ("2", "3"):
            mem = amb["memory"][d]
            assert mem["pods"] == 2 * int(d) and 0 < mem["pss_kib"] <= mem["rss_kib"]
            assert set(mem["by_process"]) >= {"ztunnel/n1", "ztunnel/n2"}
        assert amb["startup"]["median_ms"] > 0 and amb["startup"]["samples_ms"]
        for d in ("2", "3"):  # pod ready, the real CNI ADD to a first answer, at each density
            ready = amb["startup_by_density"][d]
            assert ready["samples_ms"] and all(v > 0 for v in ready["samples_ms"])
            assert len(ready["cni_add_ms"]) == len(ready["samples_ms"])
            assert all(  # the pod is ready at the later of the ADD's return and the answer
                v == max(c, f)
                for v, c, f in zip(
                    ready["samples_ms"], ready["cni_add_ms"], ready["first_answer_ms"], strict=True
                )
            )
        assert "pod ready ms, median (3/node)" in (out / "report.md").read_text()
        ref = [r for r in amb["runs"] if r["protocol"] == "http/1.1" and r["body_size"] == 0
               and r["target_rate"] == 200.0]  # fmt: skip
        assert ref and ref[0]["samples_ms"]
        md = (out / "report.md").read_text()
        assert "| ambient L4 (ztunnel)" in md and "| no mesh" in md
        for png in ("latency_vs_rate.png", "latency_distribution.png", "memory_per_pod.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # everything of the labs is gone
        assert netns_list(name) == []
        assert not list((state / "labs").glob("*.json")) if (state / "labs").exists() else True
        assert not [p for p in cgroups.iterdir() if p.is_dir()] if cgroups.exists() else True
        assert not pins.exists() or not any(pins.iterdir())
        left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"processes left: {left.stdout}"
    finally:
        for root in (cgroups, pins):
            if root.exists():
                for sub in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                    sub.rmdir()
                root.rmdir()
        shutil.rmtree(state, ignore_errors=True)
