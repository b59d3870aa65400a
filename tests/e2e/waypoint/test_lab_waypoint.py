"""The waypoint in the lab (root: real netns, cgroups, BPF or netfilter capture): a client
pod reaching `reviews` sees the HTTPRoute's 80/20 split between reviews-v1 and reviews-v2,
through the namespace's waypoint started by `apply_waypoint`."""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.lab.lab import Lab
from meshctl.lab.names import LabPaths
from meshctl.lab.system import netns_list
from meshctl.lab.waypoint_demo import run_split, splits
from meshctl.lab.waypoints import apply_waypoint, pod_name

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "examples" / "waypoint-split.yaml"


@pytest.fixture
def lab() -> Iterator[Lab]:
    suffix = secrets.token_hex(2)
    paths = LabPaths(
        f"wp{suffix}",
        state_root=Path(f"/run/ambientmesh-test-{suffix}"),
        cgroup_root=Path(f"/sys/fs/cgroup/unified/ambientmesh-test-{suffix}"),
        pin_root=Path(f"/sys/fs/bpf/ambientmesh-test-{suffix}"),
    )
    lab = Lab(paths, out=lambda _m: None)
    try:
        lab.up(EXAMPLE)
        yield lab
    finally:
        problems = lab.down(quiet=True)
        left = [f"netns {n}" for n in netns_list(paths.prefix)]
        left += [str(p) for p in (paths.lab_cgroup, paths.state_dir) if p.exists()]
        for root in (paths.cgroup_root, paths.pin_root):
            with contextlib.suppress(FileNotFoundError):
                root.rmdir()
        shutil.rmtree(paths.state_root, ignore_errors=True)
        assert not problems, problems
        assert not left, left


def test_reviews_split_80_20_through_the_waypoint(lab: Lab) -> None:
    found = splits(lab.snapshot())
    assert [(s.service.key, s.client, s.weights) for s in found] == [
        ("bookinfo/reviews", "productpage", {"reviews-v1": 0.8, "reviews-v2": 0.2})
    ]
    assert run_split(lab, found[0], count=400)
    snap = lab.snapshot()
    wp = snap.pod("bookinfo", pod_name("waypoint"))
    assert wp is not None and snap.identity(wp) == "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
    assert not snap.is_ambient(wp)  # never captured: it speaks HBONE itself
    # applying again is a no-op: same pod, same address
    assert apply_waypoint(lab, "bookinfo") == wp.ip
