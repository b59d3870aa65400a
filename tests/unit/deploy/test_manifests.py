"""The rendered installation validated against the Kubernetes schemas (kubernetes-validate), our
CRDs checked for structural schemas, and example custom resources validated against them."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mesh.config.kube import DEFAULT_KINDS, WAYPOINT_KINDS
from meshctl.errors import UsageError
from meshctl.install import crds, merge_values, parse_set, render, render_yaml

ROOT = Path(__file__).resolve().parents[3]
K8S_VERSION = "1.30.0"  # oldest release whose bound tokens carry the node name


def objs(kind: str, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (docs if docs is not None else render()) if d["kind"] == kind]


def one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (d,) = [o for o in objs(kind, docs) if o["metadata"]["name"] == name]
    return d


@pytest.mark.parametrize("doc", render(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_rendered_object_validates_against_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_object() -> None:
    """Guard against a validator that accepts anything: the tests above must be able to fail."""
    ds = copy.deepcopy(one("DaemonSet", "ztunnel"))
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    crd = copy.deepcopy(crds()[0])
    crd["spec"]["scope"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def _walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for k, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_crds_are_structural_and_istio_compatible() -> None:
    by_name = {c["metadata"]["name"]: c for c in crds()}
    assert set(by_name) == {
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
    }
    for crd in by_name.values():
        spec = crd["spec"]
        assert spec["group"] == "security.istio.io" and spec["scope"] == "Namespaced"
        versions = {v["name"]: v for v in spec["versions"]}
        assert set(versions) == {"v1", "v1beta1"}
        assert sum(v["storage"] for v in versions.values()) == 1
        assert all(v["served"] for v in versions.values())
        for v in versions.values():
            root = v["schema"]["openAPIV3Schema"]
            for path, node in _walk(root, v["name"]):
                assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
            assert root["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    assert by_name["peerauthentications.security.istio.io"]["spec"]["names"]["shortNames"] == ["pa"]


def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    for crd in crds():
        if crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
                    return schema
    raise KeyError(kind)


def _examples() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "examples" / "kinds.yaml").read_text())
    return [d for d in docs if d and d["apiVersion"].startswith("security.istio.io/")]


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_example_resources_validate_against_our_crds(version: str) -> None:
    examples = _examples()
    assert {d["kind"] for d in examples} == {"AuthorizationPolicy", "PeerAuthentication"}
    for doc in examples:
        schema = _crd_schema(doc["kind"], version)
        jsonschema.Draft7Validator(schema).validate(
            {**doc, "apiVersion": f"security.istio.io/{version}"}
        )
    ap = copy.deepcopy(next(d for d in examples if d["kind"] == "AuthorizationPolicy"))
    ap["spec"]["action"] = "MAYBE"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_crd_schema("AuthorizationPolicy", version)).validate(ap)
    pa = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "x"},
        "spec": {"portLevelMtls": {"8080": {"mode": "DISABLE"}}, "mtls": {"mode": "STRICTER"}},
    }
    with pytest.raises(jsonschema.ValidationError, match="STRICTER"):
        jsonschema.Draft7Validator(_crd_schema("PeerAuthentication", version)).validate(pa)


def test_rbac_is_least_privilege() -> None:
    docs = render()
    roles = {r["metadata"]["name"]: r["rules"] for r in objs("ClusterRole", docs)}
    writes = {"create", "update", "patch", "delete", "deletecollection", "*"}
    zt = roles["ambientmesh-ztunnel"]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in zt)
    readable = {(g, res) for r in zt for g in r["apiGroups"] for res in r["resources"]}
    assert readable == {
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("networking.k8s.io", "networkpolicies"),
        ("cilium.io", "ciliumnetworkpolicies"),
    }
    # ztunnel's KubeSource lists and watches exactly these: a kind added there needs RBAC here.
    assert readable == {(k.group, k.plural) for k in DEFAULT_KINDS}
    ca = roles["ambientmesh-ca"]
    assert {"create"} == {v for r in ca for v in r["verbs"]} & writes
    assert [r["resources"] for r in ca if "create" in r["verbs"]] == [["tokenreviews"]]
    ctl = roles["ambientmesh-waypoint-controller"]
    for r in ctl:
        if set(r["verbs"]) & writes:
            assert set(r["resources"]) <= {
                "gateways/status",
                "deployments",
                "services",
                "serviceaccounts",
                "configmaps",  # the trust bundle copied beside each waypoint
                "clusterrolebindings",  # the waypoints' read access (subjects only)
            }
        if "clusterrolebindings" in r["resources"] and set(r["verbs"]) != {"create"}:
            assert r["resourceNames"] == ["ambientmesh-waypoint"]  # no other binding
    # `bind` (needed to bind a role one does not hold), on the waypoints' role only
    (bind,) = [r for r in ctl if "bind" in r["verbs"]]
    assert bind["resources"] == ["clusterroles"] and bind["verbs"] == ["bind"]
    assert bind["resourceNames"] == ["ambientmesh-waypoint"]
    # waypoints only read, and exactly what their KubeSource watches
    wp = roles["ambientmesh-waypoint"]
    assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in wp)
    wp_readable = {(g, res) for r in wp for g in r["apiGroups"] for res in r["resources"]}
    assert wp_readable == {(k.group, k.plural) for k in WAYPOINT_KINDS}
    assert wp_readable == readable | {
        ("security.istio.io", "requestauthentications"),
        ("", "configmaps"),
    }
    assert not any("secrets" in r["resources"] for rules in roles.values() for r in rules)
    assert all(
        "*" not in r["verbs"] and "*" not in r["resources"]
        for rules in roles.values()
        for r in rules
    )
    # every binding points at a ServiceAccount that the render creates
    sas = {
        (s["metadata"]["namespace"], s["metadata"]["name"]) for s in objs("ServiceAccount", docs)
    }
    for b in objs("ClusterRoleBinding", docs):
        assert b["roleRef"]["name"] in roles
        for s in b["subjects"]:
            assert (s["namespace"], s["name"]) in sas


def test_ztunnel_daemonset_has_what_a_node_proxy_needs() -> None:
    ds = one("DaemonSet", "ztunnel")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    zt = next(c for c in pod["containers"] if c["name"] == "ztunnel")
    assert zt["securityContext"]["privileged"] is True
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/var/run/netns",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/lib/modules",
        "/usr/src",
        "/run/ambientmesh",
    } <= host
    mounts = {m["mountPath"]: m for m in zt["volumeMounts"]}
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert zt["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert zt["livenessProbe"]["httpGet"]["port"] == 15021
    assert zt["resources"]["requests"]
    installer = next(c for c in pod["containers"] if c["name"] == "install-cni")
    assert "cni.install" in installer["command"]
    assert not installer["securityContext"].get("privileged")
    assert {t.get("operator") for t in pod["tolerations"]} == {"Exists"}
    token = next(v for v in pod["volumes"] if v["name"] == "ca-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "ambientmesh-ca"


def _ztunnel(values: dict[str, Any] | None = None) -> dict[str, Any]:
    ds = one("DaemonSet", "ztunnel", render(values))
    c: dict[str, Any] = next(
        c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "ztunnel"
    )
    return c


def test_ztunnel_serves_flows_on_15030_unless_switched_off() -> None:
    """`meshctl observe --kube` reads ztunnel's /flows through pods/proxy; on a hostNetwork
    pod that port is the node's, so `observe.flowsPort` can turn it off."""
    zt = _ztunnel()
    assert zt["args"][zt["args"].index("--flows-addr") + 1] == "0.0.0.0:15030"
    assert {"name": "http-flows", "containerPort": 15030, "protocol": "TCP"} in zt["ports"]
    for off in ("0", "off", "false"):
        zt = _ztunnel(parse_set(f"observe.flowsPort={off}"))
        assert "--flows-addr" not in zt["args"]
        assert all(p["containerPort"] != 15030 for p in zt["ports"])
    zt = _ztunnel(parse_set("observe.flowsPort=15031"))
    assert zt["args"][zt["args"].index("--flows-addr") + 1] == "0.0.0.0:15031"
    for bad in ("70000", "-1", "sometimes"):
        with pytest.raises(UsageError, match=r"observe\.flowsPort"):
            render(parse_set(f"observe.flowsPort={bad}"))


def test_the_waypoint_role_is_the_one_the_controller_binds() -> None:
    from controller.waypoint import WAYPOINT_CLUSTER_ROLE

    role = one("ClusterRole", WAYPOINT_CLUSTER_ROLE)
    assert role["rules"]
    # the binding is the controller's (its subjects follow the Gateways), not the render's
    assert not [
        b for b in objs("ClusterRoleBinding") if b["metadata"]["name"] == "ambientmesh-waypoint"
    ]


def test_every_workload_has_probes_resources_and_a_budget() -> None:
    docs = render()
    pdbs = objs("PodDisruptionBudget", docs)
    for kind in ("Deployment", "DaemonSet"):
        for w in objs(kind, docs):
            for c in w["spec"]["template"]["spec"]["containers"]:
                assert c["resources"]["requests"], (w["metadata"]["name"], c["name"])
                assert c["resources"]["limits"]["memory"], (w["metadata"]["name"], c["name"])
            main = w["spec"]["template"]["spec"]["containers"][0]
            assert main["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
            if kind == "Deployment":
                sel = w["spec"]["selector"]["matchLabels"]
                assert [p for p in pdbs if p["spec"]["selector"]["matchLabels"] == sel], w[
                    "metadata"
                ]["name"]
    assert one("PodDisruptionBudget", "ambientmesh-ca", docs)["spec"]["minAvailable"] == 1


def test_values_files_and_set_override_and_typos_are_refused(tmp_path: Path) -> None:
    docs = render(
        {"namespace": "mesh", "ztunnel": {"maxUnavailable": "10%"}, "crds": {"install": False}}
    )
    assert not objs("CustomResourceDefinition", docs)
    assert one("DaemonSet", "ztunnel", docs)["metadata"]["namespace"] == "mesh"
    assert one("DaemonSet", "ztunnel", docs)["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": "10%"
    }
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert parse_set("ca.replicas=3") == {"ca": {"replicas": 3}}
    assert parse_set("image.tag=1.10") == {"image": {"tag": "1.10"}}
    with pytest.raises(UsageError, match=r"ztunnel\.maxUnavailabel"):
        merge_values({"ztunnel": {"maxUnavailable": 1}}, {"ztunnel": {"maxUnavailabel": 2}})
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_set("novalue")

    values = tmp_path / "values.yaml"
    values.write_text("image: {tag: v9}\nca: {replicas: 3}\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshctl.cli",
            "install",
            "--render",
            "--values",
            str(values),
            "--set",
            "ca.replicas=4",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    ca = one("Deployment", "ambientmesh-ca", rendered)
    assert ca["spec"]["replicas"] == 4
    assert ca["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v9")
    bad = subprocess.run(
        [sys.executable, "-m", "meshctl.cli", "install", "--render", "--set", "nope=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown value 'nope'" in bad.stderr


def test_checked_in_manifests_match_the_default_render() -> None:
    """deploy/ambientmesh.yaml is for `kubectl apply -f` without meshctl; it must not drift.
    Regenerate: python3 -m meshctl.cli install --render > deploy/ambientmesh.yaml"""
    assert (ROOT / "deploy" / "ambientmesh.yaml").read_text() == render_yaml()
