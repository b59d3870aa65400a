"""A restarted ztunnel re-enrols the pods a previous one served, from its state file, without
the CNI plugin running again; pods deleted meanwhile are dropped; a damaged file is ignored.
Real netns (root only)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from ztunnel.inpod.workloadmanager import WorkloadManager
from ztunnel.proxy import Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def pod_netns() -> Iterator[tuple[str, str]]:
    sfx = secrets.token_hex(2)
    name, ip = f"am-{sfx}-rst", f"10.{0x40 + int(sfx[:2], 16) % 64}.{int(sfx[2:], 16)}.2"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        yield name, ip
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def manifest(ip: str) -> list[dict[str, Any]]:
    return [
        {"kind": "Namespace", "apiVersion": "v1",
         "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"nodeName": "n1", "serviceAccountName": "web"}, "status": {"podIP": ip}},
    ]  # fmt: skip


async def listening_in(netns: str, port: int) -> bool:
    ns = NetNs(f"/run/netns/{netns}")
    try:
        sock = await ns.connect("127.0.0.1", port, connect_timeout=2)
    except OSError:
        return False
    finally:
        ns.close()
    sock.close()
    return True


async def test_restart_reenrols_from_state_and_drops_gone_pods(
    pod_netns: tuple[str, str], tmp_path: Path
) -> None:
    netns, ip = pod_netns
    snap = parse_objects(manifest(ip))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    state = tmp_path / "enrol.sock.pods.json"

    def manager() -> WorkloadManager:
        node = Node("n1", lambda: snap, ids, MeshMetrics())
        return WorkloadManager(node, outbound_port=15001, state_path=state)

    first = manager()
    assert await first.add("shop/web", f"/run/netns/{netns}", None)
    assert json.loads(state.read_text())[0]["pod"] == "shop/web"
    await first.close()  # ztunnel stops: listeners gone, the state file stays
    assert not await listening_in(netns, 15001)

    second = manager()  # the restarted ztunnel
    assert await second.restore() == 1
    assert "shop/web" in second.enrolled
    assert await listening_in(netns, 15001)
    await second.close()

    await asyncio.to_thread(sh, "ip", "netns", "del", netns)  # the pod was deleted meanwhile
    third = manager()
    assert await third.restore() == 0
    assert json.loads(state.read_text()) == []
    await third.close()


async def test_damaged_state_file_is_ignored(tmp_path: Path) -> None:
    snap = parse_objects(manifest("10.1.1.1"))
    ids = Identities(CertificateAuthority.init(tmp_path / "ca"))
    state = tmp_path / "pods.json"
    for junk in ("{not json", '{"pod": "x"}', '[{"netns": 3}, "x"]'):
        state.write_text(junk)
        m = WorkloadManager(Node("n1", lambda: snap, ids, MeshMetrics()), state_path=state)
        assert await asyncio.wait_for(m.restore(), 5) == 0
        await m.close()
