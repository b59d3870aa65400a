"""The lab's own wiring with plain (non-mesh) pods: real netns, cgroups, CNI plugins,
kube-proxy-style VIPs, and a `down` that leaves nothing, even after a crash mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshctl.lab.demo import wait_for_app
from meshctl.lab.lab import Lab
from meshctl.lab.names import netns_path
from meshctl.lab.processes import REPO_ROOT
from meshctl.lab.state import LabState
from tests.e2e.lab.labkit import MANIFEST, LabFactory, leftovers, remove_roots, unique_paths

GETPEERNAME = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5);"
    "print('%s:%d' % s.getpeername()); s.close()"
)


def client(lab: Lab, pod: str, url: str, *args: str) -> list[dict[str, Any]]:
    ns, name = pod.split("/")
    res = lab.exec_in_pod(ns, name, ["python", "-m", "mesh.apps.client", url, *args])
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_plain_pods_reach_vips_across_and_within_nodes(lab_factory: LabFactory) -> None:
    lab = lab_factory(mesh=False)
    for pod in ("plain/echo-far", "plain/echo-near"):
        wait_for_app(lab, pod)
    snap = lab.snapshot()
    cli = snap.pod("plain", "client")
    far = snap.pod("plain", "echo-far")
    assert cli is not None and far is not None and cli.ip and far.ip
    assert cli.ip.startswith("10.244.1.") and far.ip.startswith("10.244.2.")
    out = client(lab, "plain/client", "http://10.96.7.7/x", "--count", "24", "--new-connection")
    assert len(out) == 24 and all(o["ok"] for o in out), out
    by_pod: dict[str, set[str]] = {}
    for o in out:
        by_pod.setdefault(o["body"]["pod"], set()).add(o["body"]["peer"].rsplit(":", 1)[0])
    # kube-proxy's random choice: with 24 tries both endpoints answer (p(miss) = 2^-23)
    assert set(by_pod) == {"echo-far", "echo-near"}
    # across nodes the source address survives routing and DNAT
    assert by_pod["echo-far"] == {cli.ip}
    # within a node the hairpin is masqueraded to the node's bridge address
    assert by_pod["echo-near"] == {"10.244.1.1"}
    # the app's getpeername shows the VIP it dialled, not the endpoint
    res = lab.exec_in_pod("plain", "client", ["python", "-c", GETPEERNAME, "10.96.7.7", "80"])
    assert res.stdout.strip() == "10.96.7.7:80", res.stderr


def test_pod_processes_live_in_their_netns_and_cgroup(lab_factory: LabFactory) -> None:
    lab = lab_factory(mesh=False)
    for rec in lab.state.procs:
        assert rec.kind == "pod"
        info = lab.state.pods[rec.name]
        procs = Path(info["cgroup"], "cgroup.procs").read_text().split()
        assert str(rec.pid) in procs, (rec.name, procs)
        assert (
            os.stat(f"/proc/{rec.pid}/ns/net").st_ino == os.stat(netns_path(info["netns"])).st_ino
        )
    # a one-off exec joins the pod's cgroup too (the BPF programs must see its sockets)
    ns, name = "plain", "client"
    cg = lab.state.pods["plain/client"]["cgroup"]
    res = lab.exec_in_pod(ns, name, ["cat", "/proc/self/cgroup"])
    assert res.stdout.strip().endswith(cg.removeprefix("/sys/fs/cgroup/unified")), res.stdout


def test_label_change_rewrites_generated_config(lab_factory: LabFactory) -> None:
    lab = lab_factory(mesh=False)
    snap = lab.snapshot()
    client_pod = snap.pod("plain", "client")
    assert client_pod is not None and not snap.is_ambient(client_pod)
    lab.label("Namespace", None, "plain", "istio.io/dataplane-mode=ambient")
    snap = lab.snapshot()
    client_pod = snap.pod("plain", "client")
    assert client_pod is not None and snap.is_ambient(client_pod)
    assert client_pod.ip == lab.state.pods["plain/client"]["ip"]  # IPs survive the rewrite
    assert lab.state.pods["plain/client"]["ambient"] is True
    lab.label("Pod", "plain", "client", "istio.io/dataplane-mode=none")
    snap = lab.snapshot()
    client_pod = snap.pod("plain", "client")
    assert client_pod is not None and not snap.is_ambient(client_pod)


def test_crash_mid_way_then_down_removes_everything(tmp_path: Path) -> None:
    """Kill `lab up` while it builds, lose the state file too: `down` finds the rest by name."""
    paths = unique_paths()
    f = tmp_path / "m.yaml"
    f.write_text(MANIFEST)
    cmd = [sys.executable, "-m", "meshctl", "lab", "up", str(f), "--no-mesh",
           "--name", paths.lab, "--state-root", str(paths.state_root),
           "--cgroup-root", str(paths.cgroup_root), "--pin-root", str(paths.pin_root)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    up = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = LabState.load(paths.state_file) if paths.state_file.exists() else None
            if st is not None and len(st.cni) >= 3:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("lab up never got to the pods")
        up.send_signal(signal.SIGKILL)
        up.wait(10)
        assert [n for n in os.listdir("/var/run/netns") if n.startswith(paths.prefix)]
        paths.state_file.unlink()
        lab = Lab(paths, out=lambda _m: None)
        assert lab.down(quiet=True) == []
        assert lab.down(quiet=True) == []  # idempotent
        assert leftovers(paths, []) == []
    finally:
        if up.poll() is None:
            up.kill()
        Lab(paths, out=lambda _m: None).down(quiet=True)
        remove_roots(paths)


def test_cli_up_status_down(tmp_path: Path) -> None:
    paths = unique_paths()
    f = tmp_path / "m.yaml"
    f.write_text(MANIFEST)
    roots = ["--name", paths.lab, "--state-root", str(paths.state_root), "--cgroup-root",
             str(paths.cgroup_root), "--pin-root", str(paths.pin_root)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshctl", "lab", *args, *roots],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    try:
        up = meshctl("up", str(f), "--no-mesh")
        assert up.returncode == 0, up.stderr
        assert "plain/client" in up.stdout and "10.244.1." in up.stdout
        again = meshctl("up", str(f), "--no-mesh")
        assert again.returncode == 1 and "already up" in again.stderr
        st = meshctl("status", "--json")
        pids = [p["pid"] for p in json.loads(st.stdout)["procs"]]
        assert len(pids) == 6
        down = meshctl("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert leftovers(paths, pids) == []
        assert meshctl("down").returncode == 0  # idempotent
        assert meshctl("status").returncode == 3
    finally:
        meshctl("down")
        remove_roots(paths)


def test_bad_manifest_is_a_usage_error_naming_the_object(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "meshctl", "lab", "up", str(f), "--name", "amzz",
         "--state-root", str(tmp_path / "state")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "Pod a/p" in res.stderr and "spec.nodeName" in res.stderr
    assert not (tmp_path / "state" / "labs" / "amzz.json").exists()
