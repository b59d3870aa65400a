"""Pods running before the install: found from a real process in a real netns and a cgroup laid
out as the kubelet's runtime lays it out (`.../pod<uid>/<container>`), then enrolled by the
workload manager with listeners inside that netns (root only)."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from ztunnel.inpod.discover import Discoverer, sandbox_of
from ztunnel.inpod.workloadmanager import WorkloadManager
from ztunnel.proxy import Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, cgroups)")

ROOT = "/sys/fs/cgroup/unified"


@dataclass
class RunningPod:
    uid: str
    netns: str
    pod_cgroup: Path
    pid: int


@pytest.fixture
def running_pod() -> Iterator[RunningPod]:
    sfx = secrets.token_hex(2)
    uid = f"0badc0de-{sfx}-4000-8000-00000000{sfx}"
    ns = f"am-{sfx}-old"
    top = Path(ROOT) / f"ambientmesh-test-{sfx}"
    pod_cg = top / "kubepods" / "besteffort" / f"pod{uid}"
    container = pod_cg / "c0ffee"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", "10.99.0.2/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"]):  # fmt: skip
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        container.mkdir(parents=True)
        # the sandbox: started in its netns, then put in the container cgroup like a runtime
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
        want = os.stat(f"/run/netns/{ns}").st_ino
        for _ in range(100):  # `ip netns exec` has switched netns before it execs sleep
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                break
            time.sleep(0.02)
        (container / "cgroup.procs").write_text(str(proc.pid))
        yield RunningPod(uid, ns, pod_cg, proc.pid)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        if top.exists():
            top.rmdir()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def manifest(uid: str, *, ambient: bool) -> list[dict[str, Any]]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return [
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": labels}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "old", "namespace": "shop", "uid": uid},
         "spec": {"nodeName": "n1", "serviceAccountName": "old"},
         "status": {"podIP": "10.99.0.2"}},
    ]  # fmt: skip


def test_sandbox_found_by_uid(running_pod: RunningPod) -> None:
    box = sandbox_of(running_pod.uid, cgroup_root=ROOT)
    assert box is not None
    assert box.pid == running_pod.pid
    assert Path(box.cgroup) == running_pod.pod_cgroup  # the pod level, above its containers
    assert os.stat(box.netns).st_ino == os.stat(f"/run/netns/{running_pod.netns}").st_ino
    assert sandbox_of("00000000-0000-4000-8000-000000000000", cgroup_root=ROOT) is None


async def test_running_pod_is_enrolled_and_swept_only_once(
    running_pod: RunningPod, tmp_path: Path
) -> None:
    snap = parse_objects(manifest(running_pod.uid, ambient=True))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    manager = WorkloadManager(Node("n1", lambda: snap, ids, MeshMetrics()), outbound_port=15001)
    found: list[str] = []

    def find(uid: str) -> Any:
        found.append(uid)
        return sandbox_of(uid, cgroup_root=ROOT)

    disc = Discoverer(manager, find=find)
    try:
        assert await disc.sweep(snap) == 1
        assert "shop/old" in manager.enrolled
        ns = NetNs(f"/run/netns/{running_pod.netns}")
        try:  # ztunnel's outbound listener is inside the old pod's netns now
            (await ns.connect("127.0.0.1", 15001, connect_timeout=2)).close()
        finally:
            ns.close()
        assert await disc.sweep(snap) == 0  # known: not searched again
        assert found == [running_pod.uid]
    finally:
        await manager.close()
