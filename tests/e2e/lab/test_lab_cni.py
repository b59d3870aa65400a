"""In enrol capture the lab enrols pods through our chained CNI plugin, as a node does: the
plugin ran for every pod with the bridge's result as prevResult, and ztunnel enrolled exactly
the ambient ones; run again as the runtime runs it, it passes pods outside the mesh while
ztunnel is down, refuses ambient ones, and its DEL unenrols (root only)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from meshctl.lab import observe
from meshctl.lab.demo import wait_for_app
from meshctl.lab.lab import Lab
from meshctl.lab.system import LabError
from meshctl.lab.ztunnels import ZtunnelFeatures, enrol_request
from tests.e2e.lab.labkit import LabFactory


@pytest.fixture
def enrol_lab(lab_factory: LabFactory) -> Lab:
    if not ZtunnelFeatures.probe().enrol_socket:
        pytest.skip("ztunnel has no --enrol-socket")
    return lab_factory(mesh=True, capture="enrol")


def test_every_pod_went_through_the_plugin_and_ztunnel_chose_the_ambient_ones(
    enrol_lab: Lab,
) -> None:
    lab = enrol_lab
    st = lab.state
    for rec in st.cni:
        types = [c["type"] for c in rec.configs]
        assert types == ["loopback", "bridge", "ambientmesh-cni"], (rec.pod, types)
        assert rec.results[-1]["ips"] == rec.results[-2]["ips"]  # prevResult passed through
    log = (lab.paths.state_dir / "cni.log").read_text()
    enrolled: set[str] = set()
    for node in st.nodes:
        reply = enrol_request(lab.paths.enrol_socket(node), {"op": "list"})
        enrolled |= {p["pod"] for p in reply["pods"] if p["enrolled"]}
    ambient = {k for k, v in st.pods.items() if k.startswith("mesh/")}
    assert enrolled == ambient
    for pod in st.pods:
        verdict = "enrolled" if pod in ambient else "not in the mesh"
        assert f"ADD {pod}: {verdict}" in log, (pod, log)
    # the plugin told ztunnel about the non-ambient pods too: a label makes them ambient live
    known = {p["pod"] for n in st.nodes
             for p in enrol_request(lab.paths.enrol_socket(n), {"op": "list"})["pods"]}  # fmt: skip
    assert known == set(st.pods), json.dumps(sorted(known))
    # what `lab up` prints last: each pod with its node, IP and (ambient ones) identity
    rows = {line.split()[0]: line.split() for line in lab.pods_table().splitlines()[1:]}
    assert set(rows) == set(st.pods)
    for pod, row in rows.items():
        ns, name = pod.split("/")
        sa = lab.snapshot().pod(ns, name)
        assert sa is not None
        assert row[1:3] == [st.pods[pod]["node"], st.pods[pod]["ip"]]
        want = f"spiffe://cluster.local/ns/{ns}/sa/{sa.service_account}" if pod in ambient else "-"
        assert row[4] == want, row


def bridge_result(lab: Lab, pod: str) -> dict[str, Any]:
    rec = next(r for r in lab.state.cni if r.pod == pod)
    return rec.results[[c["type"] for c in rec.configs].index("bridge")]


def test_with_ztunnel_down_plain_pods_pass_and_ambient_pods_are_refused(enrol_lab: Lab) -> None:
    """The runtime runs the chain for new pods whether ztunnel is up or not: a pod outside
    the mesh must never wait for ztunnel, an ambient one must not start unenrolled."""
    lab = enrol_lab
    lab.stop_ztunnel("n1")
    result = lab.cni_mesh_plugin("ADD", "plain", "client")
    assert result["ips"] == bridge_result(lab, "plain/client")["ips"]  # prevResult, unchanged
    with pytest.raises(LabError) as err:
        lab.cni_mesh_plugin("ADD", "mesh", "web")
    assert "mesh/web is ambient but ztunnel is unreachable" in str(err.value)
    log = (lab.paths.state_dir / "cni.log").read_text()
    assert "ADD plain/client: ztunnel unreachable" in log and "not ambient, passing" in log
    assert "error 11: pod mesh/web is ambient" in log  # 11: the runtime retries later
    # a new ztunnel takes the node's pods back from its own state, and the plugin works again
    lab.restart_ztunnel("n1")
    assert lab.cni_mesh_plugin("ADD", "mesh", "web")["ips"] == bridge_result(lab, "mesh/web")["ips"]


def test_plugin_del_unenrols_the_pod_and_its_traffic_leaves_unmeshed(enrol_lab: Lab) -> None:
    lab = enrol_lab
    wait_for_app(lab, "mesh/server")
    web = str(lab.state.pods["mesh/web"]["ip"])
    lab.cni_mesh_plugin("DEL", "mesh", "web")
    known = {p["pod"] for p in enrol_request(lab.paths.enrol_socket("n1"), {"op": "list"})["pods"]}
    assert "mesh/web" not in known and "mesh/batch" in known
    svc = lab.snapshot().service("mesh", "server")
    assert svc is not None
    res = lab.exec_in_pod(
        "mesh", "web", ["python", "-m", "mesh.apps.client", f"http://{svc.cluster_ip}/",
                        "--count", "1", "--timeout", "3"],
    )  # fmt: skip
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert out and out[0]["ok"], res.stdout + res.stderr  # PERMISSIVE: plaintext is let in
    time.sleep(0.3)
    # no redirect left in web's cgroup: n1's ztunnel never saw the connection, and the
    # server's ztunnel took it as plaintext from web's own address, not as mutual TLS
    n1 = observe.records_from(lab.ztunnel_access_log("n1"), web)
    n2 = observe.records_from(lab.ztunnel_access_log("n2"), web)
    assert n1 == [], n1
    assert n2 and not any(r["mtls"] for r in n2), n2
