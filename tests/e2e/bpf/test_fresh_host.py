"""A fresh host has no bpffs at /sys/fs/bpf (systemd mounts one; minimal images, VMs and CI
machines often don't). Each test runs in a private mount namespace where /sys/fs/bpf is
unmounted, so it sees exactly that host whatever an earlier run mounted here, and whatever it
mounts vanishes (pins included) when the namespace does. Root only."""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, BPF)")

ROOT = Path(__file__).resolve().parents[3]
UNMOUNT = "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; "


def fresh(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh) where /sys/fs/bpf has nothing mounted, as on a fresh machine."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", UNMOUNT + script],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip


PY = shlex.quote(sys.executable)


def test_loader_mounts_bpffs_at_its_root_and_pins_below() -> None:
    pins = f"/sys/fs/bpf/ambientmesh-test-{secrets.token_hex(2)}/n1"
    r = fresh(f"{PY} -m bpf.loader load --pin-root {pins} && mountpoint /sys/fs/bpf && "
              f"stat -f -c %T /sys/fs/bpf && ls {pins}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "mounted bpffs at /sys/fs/bpf" in r.stderr
    assert "bpf_fs" in r.stdout and "prog_connect4" in r.stdout
    assert not os.path.exists(pins)  # the namespace's bpffs went with it


def test_a_pin_root_outside_bpffs_is_refused_with_the_fix_and_nothing_mounted() -> None:
    r = fresh(f"{PY} -m bpf.loader load --pin-root /tmp/am-not-bpffs/n1; echo rc=$?; "
              "mountpoint -q /sys/fs/bpf && echo mounted || echo unmounted")  # fmt: skip
    assert "rc=2" in r.stdout and "unmounted" in r.stdout, r.stdout + r.stderr
    assert "is not on a bpf filesystem" in r.stderr and "fix:" in r.stderr


def test_doctor_fix_mounts_bpffs_and_says_so() -> None:
    r = fresh(f"{PY} -m meshctl doctor --fix; mountpoint -q /sys/fs/bpf && echo now-mounted")
    assert "fixed: mounted bpffs at /sys/fs/bpf" in r.stdout, r.stdout + r.stderr
    assert "now-mounted" in r.stdout
    r = subprocess.run([sys.executable, "-m", "meshctl", "doctor", "--fix"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert "mounted bpffs" not in r.stdout  # already there: a second run changes nothing


def test_the_demo_runs_on_a_host_without_bpffs() -> None:
    """The README's main job, as a first-time user runs it right after setup."""
    name = f"fresh{secrets.token_hex(2)}"
    r = fresh(f"{PY} -m meshctl lab demo --name {name}", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "mounted bpffs at /sys/fs/bpf" in r.stdout
    assert "all flows as expected" in r.stdout
    from meshctl.lab.names import CGROUP_ROOT  # cgroups are not per mount namespace

    assert not (CGROUP_ROOT / name).exists()
