"""Pods that were running before ztunnel, found on a real node layout (root only): a real netns
with the pod's address, a process inside it placed in a kubelet-style pod cgroup, and ztunnel's
workload manager enrolling what discovery found (listeners really opened in that netns)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.model import Pod
from mesh.config.parse import parse_objects
from mesh.config.source import ConfigStore
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from ztunnel.existing import ExistingPods, find_pod_cgroup, find_sandbox, local_ipv4
from ztunnel.identity import Identities
from ztunnel.inpod import WorkloadManager
from ztunnel.proxy import Node

UNIFIED = Path("/sys/fs/cgroup/unified")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class RunningPod:
    netns: str  # the name under /var/run/netns
    ip: str
    uid: str
    cgroup_root: Path
    pod_cgroup: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def running_pod() -> Iterator[RunningPod]:
    """A sandbox as the kubelet + runtime leave it (systemd driver naming). The address sits on
    a veth whose peer stays in the same netns (this kernel has no dummy links)."""
    sfx = secrets.token_hex(2)
    ns = f"am-{sfx}-pod"
    ip = f"10.251.{int(sfx[:2], 16)}.{int(sfx[2:], 16) % 250 + 2}"
    uid = str(uuid.uuid4())
    root = UNIFIED / f"ambientmesh-test-{sfx}"
    pod_cg = (
        root / "kubepods.slice" / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    )  # fmt: skip
    container_cg = pod_cg / f"cri-containerd-{secrets.token_hex(8)}.scope"
    proc = None
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        container_cg.mkdir(parents=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
        (container_cg / "cgroup.procs").write_text(str(proc.pid))
        yield RunningPod(ns, ip, uid, root, pod_cg, proc)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if root.exists():
            for d in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                d.rmdir()
            root.rmdir()


def pod(p: RunningPod, *, uid: str | None = None, ip: str | None = None) -> Pod:
    return Pod("shop", "web", ip or p.ip, "n1", "web", uid=p.uid if uid is None else uid)


def test_found_by_pod_uid_in_the_cgroup_tree(running_pod: RunningPod) -> None:
    p = running_pod
    assert find_pod_cgroup(p.cgroup_root, p.uid) == p.pod_cgroup
    box = find_sandbox(pod(p), cgroup_root=p.cgroup_root)
    assert box is not None
    assert box.netns == f"/var/run/netns/{p.netns}"  # the runtime's persistent path, not /proc
    assert box.cgroup == str(p.pod_cgroup)  # the pod's cgroup, parent of all its containers
    # the same namespace, whatever the path says
    assert os.stat(box.netns).st_ino == os.stat(f"/proc/{p.proc.pid}/ns/net").st_ino


def test_found_by_address_when_the_cgroup_layout_is_unknown(
    running_pod: RunningPod, tmp_path: Path
) -> None:
    p = running_pod
    assert p.ip in local_ipv4(f"/proc/{p.proc.pid}")
    box = find_sandbox(pod(p, uid=str(uuid.uuid4())), cgroup_root=tmp_path)
    assert box is not None and box.netns == f"/var/run/netns/{p.netns}" and box.cgroup is None
    # without the runtime's bind mount, the process's own handle still names the netns
    box = find_sandbox(pod(p, uid=""), cgroup_root=tmp_path, netns_dir=tmp_path)
    assert box is not None and box.netns == f"/proc/{p.proc.pid}/ns/net"


def test_host_network_and_absent_pods_are_not_found(
    running_pod: RunningPod, tmp_path: Path
) -> None:
    assert find_sandbox(pod(running_pod, uid="", ip="127.0.0.1"), cgroup_root=tmp_path) is None
    assert find_sandbox(pod(running_pod, uid="", ip="10.250.99.99"), cgroup_root=tmp_path) is None
    # an address of the node's own netns (what a hostNetwork pod reports) is never a sandbox
    for ip in local_ipv4("/proc/self") - {"127.0.0.1"}:
        if not ip.startswith("127."):
            assert find_sandbox(pod(running_pod, uid="", ip=ip), cgroup_root=tmp_path) is None


def manifest(p: RunningPod) -> list[dict[str, Any]]:
    return [
        {"kind": "Namespace", "apiVersion": "v1",
         "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "web", "namespace": "shop", "uid": p.uid},
         "spec": {"nodeName": "n1", "serviceAccountName": "web"}, "status": {"podIP": p.ip}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "gone", "namespace": "shop", "uid": str(uuid.uuid4())},
         "spec": {"nodeName": "n1", "serviceAccountName": "web"},
         "status": {"podIP": "10.250.99.98"}},
    ]  # fmt: skip


async def test_workload_manager_enrols_what_discovery_found(
    running_pod: RunningPod, tmp_path: Path
) -> None:
    p = running_pod
    store = ConfigStore()
    store.publish(parse_objects(manifest(p)))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    node = Node("n1", lambda: store.current, ids, MeshMetrics())
    manager = WorkloadManager(node)

    def find(pod: Pod) -> Any:
        return find_sandbox(pod, cgroup_root=p.cgroup_root)

    existing = ExistingPods(manager, find=find, retry=0.2)
    task = asyncio.create_task(existing.run(store))
    try:
        for _ in range(100):
            if "shop/web" in manager.enrolled:
                break
            await asyncio.sleep(0.05)
        inpod = manager.enrolled["shop/web"]
        assert inpod.request.cgroup_path == str(p.pod_cgroup)
        assert f"{p.ip}:15001" in inpod.ports()
        # the listener really is in the pod's netns: connect to it from inside
        ns = NetNs(f"/var/run/netns/{p.netns}")
        try:
            sock = await ns.connect("127.0.0.1", 15008, connect_timeout=5)
            sock.close()
        finally:
            ns.close()
        assert existing.adopted == ["shop/web"]  # and "gone" (no sandbox) is not
        await asyncio.sleep(0.5)  # retries of the absent pod enrol nothing twice
        assert existing.adopted == ["shop/web"]
    finally:
        task.cancel()
        await manager.close()
        await node.drain(0.1)
