"""The lab's manifest handling: validation, node order, VIP allocation, generated config."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.config.model import ConfigError
from mesh.config.parse import parse_objects
from meshctl.lab import manifest
from meshctl.lab.names import LabPaths, check_lab_name


def pod(ns: str, name: str, node: str | None, labels: dict[str, str] | None = None) -> Any:
    spec: dict[str, Any] = {"containers": [{"name": "c", "command": ["sleep", "1"]}]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": spec,
    }


def svc(ns: str, name: str, cip: str | None = None) -> Any:
    spec: dict[str, Any] = {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}
    if cip:
        spec["clusterIP"] = cip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": spec}  # fmt: skip


def test_nodes_declared_first_then_in_pod_order() -> None:
    docs = [
        pod("a", "p1", "zeta"),
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "beta"}},
        pod("a", "p2", "alpha"),
        pod("a", "p3", "zeta"),
    ]
    topo = manifest.plan(manifest.flatten(docs))
    assert topo.nodes[0] == "beta"
    assert set(topo.nodes) == {"beta", "zeta", "alpha"}
    assert len(topo.nodes) == 3


def test_pod_without_node_or_command_is_named_in_the_error() -> None:
    bad = pod("a", "lost", None)
    nocmd = pod("a", "idle", "n1")
    nocmd["spec"]["containers"][0].pop("command")
    with pytest.raises(ConfigError) as e:
        manifest.plan([bad, nocmd])
    text = str(e.value)
    assert "Pod a/lost" in text and "spec.nodeName" in text
    assert "Pod a/idle" in text and "spec.containers[0].command" in text


def test_vips_keep_given_ones_and_allocate_the_rest_without_clash() -> None:
    docs = [svc("a", "x", "10.96.0.10"), svc("a", "y"), svc("b", "z")]
    vips = manifest.allocate_vips(docs)
    assert vips[("a", "x")] == "10.96.0.10"
    assert vips[("a", "y")] != "10.96.0.10"
    assert len(set(vips.values())) == 3
    assert all(v.startswith("10.96.") for v in vips.values())


def test_render_fills_what_a_cluster_would_and_parses() -> None:
    docs = manifest.flatten([pod("shop", "web", "n1", {"app": "web"}), svc("shop", "web")])
    out = manifest.render(
        docs,
        pod_ips={("shop", "web"): "10.244.1.2"},
        node_ips={"n1": "172.30.0.1"},
        vips=manifest.allocate_vips(docs),
    )
    snap = parse_objects(out)
    p = snap.pod("shop", "web")
    assert p is not None and p.ip == "10.244.1.2" and p.ready
    node = snap.node("n1")
    assert node is not None and node.address == "172.30.0.1"
    assert snap.namespace("shop") is not None  # implied namespace is materialised
    s = snap.service("shop", "web")
    assert s is not None and s.cluster_ip is not None
    assert [e.pod.ip for e in snap.endpoints(s, 80)] == ["10.244.1.2"]
    # the operator's documents are untouched
    assert "status" not in docs[0]


def test_set_label_adds_removes_and_creates_implied_namespace() -> None:
    docs = manifest.flatten([pod("shop", "web", "n1")])
    on = manifest.set_label(docs, "Namespace", None, "shop", "istio.io/dataplane-mode=ambient")
    snap = parse_objects(manifest.render(on, pod_ips={("shop", "web"): "10.244.1.2"},
                                         node_ips={}, vips={}))  # fmt: skip
    web = snap.pod("shop", "web")
    assert web is not None and snap.is_ambient(web)
    off = manifest.set_label(on, "Namespace", None, "shop", "istio.io/dataplane-mode-")
    snap = parse_objects(manifest.render(off, pod_ips={("shop", "web"): "10.244.1.2"},
                                         node_ips={}, vips={}))  # fmt: skip
    web = snap.pod("shop", "web")
    assert web is not None and not snap.is_ambient(web)
    opt_out = manifest.set_label(on, "Pod", "shop", "web", "istio.io/dataplane-mode=none")
    snap = parse_objects(opt_out)
    web = snap.pod("shop", "web")
    assert web is not None and not snap.is_ambient(web)


@pytest.mark.parametrize("change", ["novalue", "=x"])
def test_set_label_rejects_malformed_change(change: str) -> None:
    with pytest.raises(ValueError, match="key"):
        manifest.set_label([pod("a", "p", "n")], "Pod", "a", "p", change)


def test_set_label_on_unknown_object_names_it() -> None:
    with pytest.raises(ValueError, match="Pod a/ghost"):
        manifest.set_label([pod("a", "p", "n")], "Pod", "a", "ghost", "k=v")


@pytest.mark.parametrize("name", ["a-b", "A", "", "1lab", "x" * 17])
def test_lab_names_that_could_collide_with_prefix_scans_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_lab_name(name)


def test_kinds_of_netns_cannot_collide() -> None:
    p = LabPaths("lab")
    names = {p.underlay_netns, p.node_netns("shop"), p.pod_netns("shop", "x"),
             p.pod_netns("shop-x", "y"), p.pod_netns("shop", "x-y")}  # fmt: skip
    assert len(names) == 5
    assert all(n.startswith("lab-") for n in names)
    assert not LabPaths("lab1").prefix.startswith(p.prefix.rstrip("-") + "-")
