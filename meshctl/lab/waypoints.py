"""Waypoints in the lab: `meshctl waypoint apply -n NS --lab NAME` declares the Gateway and
runs the waypoint as a pod, the way the waypoint controller does in a cluster.

The waypoint pod is an ordinary lab pod (netns + cgroup wired by the CNI plugins) labelled
`gateway.networking.k8s.io/gateway-name=<name>` and `istio.io/dataplane-mode=none` (it speaks
HBONE itself and must never be captured), with service account `<name>`, so its identity is
`spiffe://<td>/ns/<ns>/sa/<name>`: what ztunnels expect at the waypoint and what the
destination ztunnel trusts to vouch for callers. It reads the lab's generated config (live
reload) and signs its certificate with the lab's CA. Adding it rewrites the manifest and the
generated config; the ztunnels pick the Gateway up on reload and start sending the traffic of
services labelled `istio.io/use-waypoint=<name>` (or in such a namespace) to it.
"""

from __future__ import annotations

from typing import Any

from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.ports import HBONE_PORT, METRICS_PORT, READINESS_PORT
from meshctl.gateway import gateway_manifest
from meshctl.lab import manifest
from meshctl.lab.lab import Lab
from meshctl.lab.system import LabError, http_get_in_netns, patience, wait_ready

__all__ = ["apply_waypoint", "pod_name", "waypoint_docs"]


def pod_name(name: str) -> str:
    """The waypoint's pod, named as a Deployment's would be (workload = the Gateway name)."""
    return f"{name}-0-lab"


def waypoint_docs(lab: Lab, namespace: str, name: str, node: str) -> list[manifest.Doc]:
    """The Gateway and the pod that runs it."""
    p = lab.paths
    gw = gateway_manifest(namespace, name)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name),
            "namespace": namespace,
            "labels": {
                "gateway.networking.k8s.io/gateway-name": name,
                "istio.io/dataplane-mode": "none",
            },
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": name,
            "containers": [
                {
                    "name": "waypoint",
                    "command": [
                        "python", "-m", "waypoint.main",
                        "--namespace", namespace, "--name", name,
                        "--config", str(p.config_file),
                        "--ca-dir", str(p.ca_dir),
                        "--hbone-addr", f"0.0.0.0:{HBONE_PORT}",
                        "--readiness-addr", f"0.0.0.0:{READINESS_PORT}",
                        "--metrics-addr", f"0.0.0.0:{METRICS_PORT}",
                    ],
                }
            ],
        },
    }  # fmt: skip
    return [gw, pod]


def _regenerate(lab: Lab, docs: list[manifest.Doc]) -> Snapshot:
    """Write the manifest and the generated config (the ztunnels reload it)."""
    p, st = lab.paths, lab.state
    pod_ips = {
        (k.split("/", 1)[0], k.split("/", 1)[1]): str(v["ip"])
        for k, v in st.pods.items()
        if "ip" in v
    }
    node_ips = {n: str(i["ip"]) for n, i in st.nodes.items()}
    generated = manifest.render(
        docs, pod_ips=pod_ips, node_ips=node_ips, vips=manifest.allocate_vips(docs)
    )
    snap = parse_objects(generated)
    manifest.write_atomic(p.manifest_file, manifest.dump(docs))
    manifest.write_atomic(p.config_file, manifest.dump(generated))
    return snap


def apply_waypoint(
    lab: Lab, namespace: str, name: str = "waypoint", node: str | None = None
) -> str:
    """Declare and start the waypoint `namespace/name`; returns its pod IP. Idempotent: a
    waypoint already running is left alone."""
    st = lab.state
    if not st.nodes:
        raise LabError(f"lab {lab.paths.lab} has no nodes")
    node = node or next(iter(st.nodes))
    if node not in st.nodes:
        raise LabError(f"--node {node}: not a node of lab {lab.paths.lab} ({', '.join(st.nodes)})")
    key = f"{namespace}/{pod_name(name)}"
    if key in st.pods and "ip" in st.pods[key]:
        return str(st.pods[key]["ip"])
    docs = manifest.load([lab.paths.manifest_file])
    have = {manifest.key(d) for d in docs}
    if ("Namespace", "default", namespace) not in have and not any(
        manifest.key(d)[1] == namespace for d in docs
    ):
        raise LabError(f"namespace {namespace} is not in lab {lab.paths.lab}")
    for d in waypoint_docs(lab, namespace, name, node):
        if manifest.key(d) not in have:
            docs.append(d)
    ip = lab.topology.make_pod(namespace, pod_name(name), node)
    snap = _regenerate(lab, docs)
    lab.topology.apply_service_rules(snap)
    lab.procs.start_pod(snap, namespace, pod_name(name))
    lab.topology.record_pods(snap)
    _wait_ready(lab, key, ip)
    lab.out(f"waypoint {namespace}/{name}: pod {key} at {ip}:{HBONE_PORT} on {node}")
    return ip


def _wait_ready(lab: Lab, key: str, ip: str, timeout: float = 30.0) -> None:
    netns = str(lab.state.pods[key]["netns"])
    rec = lab.procs.find("pod", key)
    if rec is None:
        raise LabError(f"waypoint {key} was never started")

    def probe() -> None:
        http_get_in_netns(netns, ip, READINESS_PORT, "/healthz/ready", timeout=patience(1.0))

    wait_ready(f"waypoint {key} (pid {rec.pid})", rec.pid, rec.start_time, rec.log, probe,
               timeout)  # fmt: skip


def waypoint_metrics(lab: Lab, namespace: str, name: str = "waypoint") -> str:
    info = lab.state.pods[f"{namespace}/{pod_name(name)}"]
    return http_get_in_netns(str(info["netns"]), str(info["ip"]), METRICS_PORT, "/metrics")
