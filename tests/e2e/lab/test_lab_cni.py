"""In enrol capture the lab enrols pods through our chained CNI plugin, as a node does: the
plugin ran for every pod with the bridge's result as prevResult, and ztunnel enrolled exactly
the ambient ones (root only)."""

from __future__ import annotations

import json

import pytest
from labkit import LabFactory

from meshctl.lab.lab import Lab, ZtunnelFeatures, enrol_request


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
