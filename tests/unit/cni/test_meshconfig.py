"""ambientmesh-cni with ztunnel unreachable and `meshConfig` (the lab's source of labels): the
same rule as the snapshot decides; what cannot be read fails the ADD with "try again"."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cni import plugin as cni

CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-out, namespace: shop, labels: {istio.io/dataplane-mode: none}}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-in, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
"""

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}]}


def add(tmp_path: Path, ns: str, name: str, config: str | None = CONFIG) -> dict[str, object]:
    conf: dict[str, object] = {
        "cniVersion": "1.0.0", "name": "pods", "type": "ambientmesh-cni",
        "enrolSocket": str(tmp_path / "nobody.sock"), "timeoutSeconds": 1, "prevResult": PREV,
    }  # fmt: skip
    if config is not None:
        path = tmp_path / "mesh.yaml"
        path.write_text(config)
        conf["meshConfig"] = str(path)
    env = {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}",
    }  # fmt: skip
    inv = cni.read_invocation(env, io.StringIO(json.dumps(conf)))
    out = cni.run(inv, cni._Log(None))
    assert out is not None
    return out


@pytest.mark.parametrize(("ns", "name"), [("legacy", "curl"), ("shop", "opt-out")])
def test_pods_outside_the_mesh_pass_with_prev_result(tmp_path: Path, ns: str, name: str) -> None:
    assert add(tmp_path, ns, name)["ips"] == PREV["ips"]


@pytest.mark.parametrize(("ns", "name"), [("shop", "web"), ("legacy", "opt-in")])
def test_ambient_pods_are_refused_for_a_retry(tmp_path: Path, ns: str, name: str) -> None:
    with pytest.raises(cni.CniError) as err:
        add(tmp_path, ns, name)
    assert err.value.code == cni.ERR_TRY_AGAIN_LATER
    assert f"{ns}/{name} is ambient but ztunnel is unreachable" in err.value.msg


def test_unreadable_mesh_config_cannot_prove_a_pod_is_outside(tmp_path: Path) -> None:
    with pytest.raises(cni.CniError) as err:
        add(tmp_path, "legacy", "curl", config="kind: [unclosed")
    assert err.value.code == cni.ERR_TRY_AGAIN_LATER
    assert "lookup in meshConfig" in err.value.msg


def test_without_any_source_the_add_fails_and_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(cni.CniError) as err:
        add(tmp_path, "legacy", "curl", config=None)
    assert "no kubeconfig (or meshConfig)" in err.value.msg
