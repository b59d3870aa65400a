"""Which outbound routes ztunnel may deliver locally (skipping HBONE): a meshed pod on this
node, reached without a waypoint; never through a waypoint, another node, or with the flag
off. Real snapshot and certificates; no sockets needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.meshkit import VIP, two_nodes
from ztunnel.proxy import Node
from ztunnel.proxy.outbound import Outbound, route_outbound

WAYPOINT: list[dict[str, Any]] = [
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
     "metadata": {"name": "waypoint", "namespace": "shop"},
     "spec": {"gatewayClassName": "waypoint",
              "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    {"kind": "Pod", "apiVersion": "v1",
     "metadata": {"name": "waypoint", "namespace": "shop",
                  "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                             "istio.io/dataplane-mode": "none"}},
     "spec": {"nodeName": "n1", "serviceAccountName": "waypoint"},
     "status": {"podIP": "127.0.0.9"}},
]  # fmt: skip


def snapshot(*, echo_node: str, waypoint: bool = False) -> Snapshot:
    docs = two_nodes(8080)
    for d in docs:
        if d["kind"] == "Pod" and d["metadata"]["name"] == "echo":
            d["spec"]["nodeName"] = echo_node
        if waypoint and d["kind"] == "Service":
            d["metadata"]["labels"] = {"istio.io/use-waypoint": "waypoint"}
    return parse_objects(docs + (WAYPOINT if waypoint else []))


@pytest.fixture
def ids(tmp_path: Path) -> Identities:
    return Identities(CertificateAuthority.init(tmp_path / "ca"))


def local_target(ids: Identities, snap: Snapshot, *, on: bool = True) -> str | None:
    node = Node("n1", lambda: snap, ids, MeshMetrics(), local_delivery=on)
    web = snap.pod("shop", "web")
    r = route_outbound(snap, web, VIP, 80)
    dst = Outbound(node)._local_target(r)
    return dst.key if dst is not None else None


def test_same_node_meshed_pod_is_delivered_locally(ids: Identities) -> None:
    assert local_target(ids, snapshot(echo_node="n1")) == "shop/echo"


def test_other_node_flag_off_and_waypoint_go_over_hbone(ids: Identities) -> None:
    assert local_target(ids, snapshot(echo_node="n2")) is None
    assert local_target(ids, snapshot(echo_node="n1"), on=False) is None
    snap = snapshot(echo_node="n1", waypoint=True)
    r = route_outbound(snap, snap.pod("shop", "web"), VIP, 80)
    assert r.kind == "hbone" and r.waypoint  # the waypoint pod is on n1 too: still not local
    assert local_target(ids, snap) is None
