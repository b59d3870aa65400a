"""Kernel-side drops on the lab (enrol capture: BPF in the pods' cgroups, root only). With the
node's ztunnel killed, an enrolled pod's connects are refused by connect4 itself; the ztunnel
that starts next finds them in the pinned counters and exports them."""

from __future__ import annotations

import os
import time

import pytest

from meshctl.lab import observe
from meshctl.lab.demo import wait_for_app
from meshctl.lab.lab import Lab
from meshctl.lab.ztunnels import ZtunnelFeatures
from tests.e2e.lab.labkit import LabFactory
from tests.e2e.lab.test_lab_mesh import client, eventually, vip
from tests.e2e.lab.test_lab_observe import observe as lab_observe


def _drops(lab: Lab, node: str, reason: str) -> float:
    return sum(
        s.value
        for s in observe.parse_metrics(lab.ztunnel_metrics(node))
        if s.name == "ambientmesh_kernel_drops_total" and s.labels.get("reason") == reason
    )


def test_ztunnel_down_drops_are_counted_by_the_next_ztunnel(lab_factory: LabFactory) -> None:
    if not ZtunnelFeatures.probe().enrol_socket:
        pytest.skip("ztunnel in this tree has no --enrol-socket")
    lab = lab_factory(mesh=True, capture="enrol")
    wait_for_app(lab, "mesh/server")
    url = f"http://{vip(lab, 'mesh', 'server')}/"
    assert eventually(lambda: all(o["ok"] for o in client(lab, "mesh/web", url, count=1)))
    node = str(lab.state.pods["mesh/web"]["node"])
    before = _drops(lab, node, "ztunnel-unavailable")
    rec = next(r for r in lab.state.procs if r.kind == "ztunnel" and r.name == node)
    os.kill(rec.pid, 9)
    time.sleep(0.3)
    out = client(lab, "mesh/web", url)
    assert [o["ok"] for o in out] == [False] * 3, out
    lab.restart_ztunnel(node)
    assert eventually(lambda: _drops(lab, node, "ztunnel-unavailable") >= before + 3)
    assert eventually(lambda: all(o["ok"] for o in client(lab, "mesh/web", url, count=1)))

    # ... and shows them as DROPPED flows, with the time they happened, like Hubble's drops
    def dropped() -> list[dict[str, object]]:
        code, flows, err = lab_observe(
            lab, "--from-pod", "mesh/web", "--verdict", "DROPPED", "--all"
        )
        assert code == 0, err
        return [f for f in flows if f["reason"] == "ztunnel unavailable"]

    assert eventually(lambda: len(dropped()) >= 3)
    for f in dropped():
        assert f["node"] == node and f["source"]["pod"] == "web"
        dst = f["destination"]
        assert isinstance(dst, dict) and dst["service"] == "server.mesh"
