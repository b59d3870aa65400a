"""Calling the CNI reference plugins the way a container runtime does.

The plugin binary runs inside the node's netns (so the `cni0` bridge and the host-side veths
live in the node, not on the host), with CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/
CNI_PATH in its environment and the network config on stdin; its JSON result on stdout carries
the pod's address. host-local keeps its leases in a lab-owned dataDir that `lab down` removes.

In the enrol capture mode the chain ends with our own plugin, `ambientmesh-cni` (cni.plugin),
exactly as the installer chains it on a Kubernetes node: it gets the bridge's result as
`prevResult` and the pod's name in `CNI_ARGS`, and asks the node's ztunnel to enrol the pod.
The lab installs it into a lab-owned bin dir placed before the reference plugins in CNI_PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cni.plugin import MAX_TIMEOUT
from meshctl.lab.names import CNI_PATH, NODE_BRIDGE, netns_path
from meshctl.lab.system import LabError, patience

CNI_VERSION = "1.0.0"


def loopback_config(lab: str) -> dict[str, Any]:
    return {"cniVersion": CNI_VERSION, "name": f"{lab}-lo", "type": "loopback"}


def bridge_config(lab: str, subnet: str, data_dir: str) -> dict[str, Any]:
    """isGateway gives the pod a default route via the bridge, which is where the node's
    kube-proxy-style rules (and the routes to other nodes) see its traffic."""
    return {
        "cniVersion": CNI_VERSION,
        "name": f"{lab}-pods",
        "type": "bridge",
        "bridge": NODE_BRIDGE,
        "isGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        },
    }


MESH_PLUGIN = "ambientmesh-cni"


def install_mesh_plugin(bin_dir: Path) -> str:
    """Put `ambientmesh-cni` in `bin_dir` (this tree's code, run by this interpreter, since the
    runtime gives plugins a bare environment); returns the CNI_PATH with it first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    exe = bin_dir / MESH_PLUGIN
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m cni.plugin "$@"\n')
    exe.chmod(0o755)
    return f"{bin_dir}:{CNI_PATH}"


def mesh_config(
    lab: str, enrol_socket: Path, log_file: Path, mesh_config_file: Path
) -> dict[str, Any]:
    """The chained entry, with the keys the installer writes on a node, except that the lab's
    source of truth for labels is the config file ztunnel reads (`meshConfig`), where a node
    has the API server (`kubeconfig`): with ztunnel down, the plugin still lets non-ambient
    pods through and refuses ambient ones."""
    return {
        "cniVersion": CNI_VERSION,
        "name": f"{lab}-pods",
        "type": MESH_PLUGIN,
        "enrolSocket": str(enrol_socket),
        # stretched on slow machines, within what the plugin accepts
        "timeoutSeconds": int(min(patience(15), MAX_TIMEOUT)),
        "excludeNamespaces": [],
        "meshConfig": str(mesh_config_file),
        "logFile": str(log_file),
    }


def _find(cni_path: str, plugin_type: str) -> str:
    for d in cni_path.split(":"):
        exe = os.path.join(d, plugin_type)
        if os.access(exe, os.X_OK):
            return exe
    raise LabError(
        f"CNI plugin {plugin_type} not in {cni_path}; "
        "fix: apt-get install -y containernetworking-plugins"
    )


def invoke(
    command: str,
    config: Mapping[str, Any],
    *,
    node_netns: str,
    container_id: str,
    pod_netns: str,
    ifname: str = "eth0",
    cni_path: str = CNI_PATH,
    cni_args: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    plugin = _find(cni_path, str(config["type"]))
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path(pod_netns),
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
    if cni_args:
        env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in cni_args.items())
    res = subprocess.run(
        ["nsenter", f"--net={netns_path(node_netns)}", plugin],
        input=json.dumps(config),
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        detail = res.stdout.strip() or res.stderr.strip()
        try:
            err = json.loads(res.stdout)
            detail = f"{err.get('msg', '')} {err.get('details', '')}".strip()
        except ValueError:
            pass
        raise LabError(f"CNI {command} {config['type']} for {container_id}: {detail}")
    if command != "ADD":
        return {}
    try:
        result: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError as exc:
        raise LabError(f"CNI ADD {config['type']}: result is not JSON: {exc}") from None
    return result


def pod_ip(result: Mapping[str, Any]) -> str:
    for ip in result.get("ips", []):
        addr = str(ip.get("address", ""))
        if "." in addr:
            return addr.split("/")[0]
    raise LabError(f"CNI result has no IPv4 address: {json.dumps(result)}")


def del_config(config: Mapping[str, Any], prev: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEL gets the ADD config plus the cached result, as libcni passes it."""
    out = dict(config)
    if prev:
        out["prevResult"] = dict(prev)
    return out
