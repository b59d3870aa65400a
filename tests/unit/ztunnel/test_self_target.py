"""Which dials land on ztunnel's own listeners (the self-loop rule), and the HBONE connection
gate's counting. Real listening sockets on loopback; namespaces stand in by their key only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.hbone import ConnectionGate, HboneLimits
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs
from tests.meshkit import two_nodes
from ztunnel.proxy import Node

POD_IP = "10.244.1.5"


def pod_netns(inode: int) -> NetNs:
    """A handle that only carries a namespace's key (entering it is not needed here)."""
    ns = NetNs.__new__(NetNs)
    ns.path, ns.inode, ns._fd = f"pod-{inode}", inode, -1
    return ns


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    snap = parse_objects(two_nodes(8080))  # n1's address: 127.0.0.1
    n = Node("n1", lambda: snap, Identities(CertificateAuthority.init(tmp_path / "ca")),
             MeshMetrics())  # fmt: skip
    yield n


def listening(host: str) -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    return s


def test_wildcard_in_pod_listener_is_reached_by_loopback_there_and_by_the_pod_ip(
    node: Node,
) -> None:
    pod = pod_netns(7)
    other = pod_netns(8)
    with listening("0.0.0.0") as s:
        port = s.getsockname()[1]
        node.add_listeners(pod, [s], addrs=[POD_IP])
        assert node.self_target("127.0.0.1", port, pod)
        assert node.self_target("0.0.0.0", port, pod)
        assert node.self_target(POD_IP, port, pod)
        assert node.self_target(POD_IP, port, None)  # from the node: routed into the pod
        assert node.self_target(POD_IP, port, other)
        assert not node.self_target("127.0.0.1", port, other)  # another pod's loopback
        assert not node.self_target("10.244.1.6", port, pod)  # another address
        assert not node.self_target(POD_IP, port + 1, pod)
        node.forget_listeners(pod)
        assert not node.self_target(POD_IP, port, pod)


def test_node_listeners_by_bound_and_node_address(node: Node) -> None:
    with listening("0.0.0.0") as hbone, listening("127.0.0.1") as admin:
        node.add_listeners(None, [hbone])
        node.add_listeners(None, [admin], forwarding=False)
        hp, ap = hbone.getsockname()[1], admin.getsockname()[1]
        assert node.self_target("127.0.0.1", hp, None)
        assert node.self_target("127.0.0.1", ap, None)
        # the node's address (from the snapshot) reaches the wildcard forwarding listener
        snap_node = node.snapshot().node("n1")
        assert snap_node is not None and snap_node.address == "127.0.0.1"
        # a non-forwarding listener (metrics, readiness) counts only through loopback
        with listening("0.0.0.0") as metrics:
            node.add_listeners(None, [metrics], forwarding=False)
            assert not node.self_target(POD_IP, metrics.getsockname()[1], pod_netns(9))
        assert not node.self_target("not-an-ip", hp, None)


def test_gate_counts_per_peer_and_in_total() -> None:
    gate = ConnectionGate(HboneLimits(max_connections_per_peer=2, max_connections=3))
    assert gate.admit("a") is None and gate.admit("a") is None
    assert gate.admit("a") == "connections_per_peer"
    assert gate.admit("b") is None
    assert gate.admit("c") == "connections"
    gate.release("a")
    assert gate.admit("c") is None
    assert (gate.total, gate.peers()) == (3, 3)
    for peer in ("a", "b", "c"):
        gate.release(peer)
    assert (gate.total, gate.peers()) == (0, 0)
