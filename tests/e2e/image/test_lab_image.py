"""The lab's demo with each node's ztunnel and the namespace's waypoint running from the built
image (`meshctl lab demo --image`): every flow as expected, the 80/20 split through the
waypoint, and proof that the processes serving it were the image's (their root is the
unpacked image) with the privileges their manifests give them; then nothing left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from meshctl import image
from meshctl.lab import container as ctr
from meshctl.lab.demo import run_demo
from meshctl.lab.lab import Lab
from meshctl.lab.system import cgroup_pids
from tests.e2e.lab.labkit import leftovers, remove_roots, seen, unique_paths

pytestmark = pytest.mark.timeout(900)  # the first test of the session pays for the build

DEMO = image.REPO_ROOT / "deploy" / "examples" / "demo.yaml"


def _same_root(pid: int, rootfs: Path) -> bool:
    """The process sees the image's rootfs as / (the same file, not an equal one)."""
    try:
        here = os.stat(f"/proc/{pid}/root/etc/passwd")
    except OSError:
        return False
    there = os.stat(rootfs / "etc" / "passwd")
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _from_image(cgroup: Path, rootfs: Path, word: str) -> list[int]:
    pids = []
    for pid in cgroup_pids(cgroup):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if word in cmd and _same_root(pid, rootfs):
            pids.append(pid)
    return pids


def test_the_demo_passes_with_ztunnel_and_the_waypoint_from_the_image(
    built_image: image.BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = unique_paths()
    lab = Lab(paths, out=print, image=built_image.archive)
    was = None
    try:
        code = run_demo(lab, DEMO, keep=True)
        out = capsys.readouterr().out
        assert code == 0, out[-4000:]
        assert "all flows as expected" in out
        assert "waypoint counted 400 requests; 0 failed" in out
        rootfs = Path(lab.state.info["image"]["rootfs"])
        for node in lab.state.nodes:
            zt = _from_image(paths.ztunnel_cgroup(node), rootfs, "ztunnel")
            assert zt, f"no ztunnel from the image in {paths.ztunnel_cgroup(node)}"
            st = _status(zt[0])
            assert st["Uid"].split()[0] == "0"  # the DaemonSet's runAsUser 0, privileged
            # privileged: every capability this host lets us hand on
            assert int(st["CapEff"], 16) == int(_status(os.getpid())["CapBnd"], 16)
        wp_key = next(k for k in lab.state.pods if "waypoint" in k)
        wp = _from_image(Path(lab.state.pods[wp_key]["cgroup"]), rootfs, "waypoint.main")
        assert wp, f"the waypoint {wp_key} did not run from the image"
        st = _status(wp[0])
        assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
        assert st["NoNewPrivs"] == "1"
        was = seen(lab)
    finally:
        was = was or seen(lab)
        problems = lab.down(quiet=True)
        left = leftovers(paths, [], was)
        remove_roots(paths)
    assert not problems, problems
    assert not left, f"lab down left: {left}"
    names = subprocess.run(["runc", "list", "-q"], capture_output=True, text=True).stdout
    assert not [n for n in names.split() if n.startswith(paths.prefix)]
    rel = str(paths.cgroup_root.name)
    assert not [h for h in ctr.cgroup_v1_hierarchies() if (h / rel).exists()]
