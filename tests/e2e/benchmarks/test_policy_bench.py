"""`python -m benchmarks.policy_bench` runs end to end with tiny numbers, prints its figures,
and leaves no netns, cgroup or BPF pin of its own behind (root only)."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _mine() -> set[str]:
    names = set(glob.glob("/sys/fs/cgroup/unified/ambientmesh-bench-*"))
    names |= set(glob.glob("/sys/fs/bpf/ambientmesh-bench-*"))
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return names | {line.split()[0] for line in out.splitlines() if "-pb" in line}


def test_policy_bench_prints_figures_and_cleans_up() -> None:
    before = _mine()
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.policy_bench", "--rules", "20", "--connects", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "compiled and installed 20 rules" in res.stdout
    assert "denied (EPERM)" in res.stdout and "x1.00 of redirect-only" in res.stdout
    assert _mine() <= before  # other runs' leftovers are not ours to judge
