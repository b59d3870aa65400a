"""Calling the CNI reference plugins the way a container runtime does.

The plugin binary runs inside the node's netns (so the `cni0` bridge and the host-side veths
live in the node, not on the host), with CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/CNI_IFNAME/
CNI_PATH in its environment and the network config on stdin; its JSON result on stdout carries
the pod's address. host-local keeps its leases in a lab-owned dataDir that `lab down` removes.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from meshctl.lab.names import CNI_PATH, NODE_BRIDGE, netns_path
from meshctl.lab.system import LabError

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


def invoke(
    command: str,
    config: Mapping[str, Any],
    *,
    node_netns: str,
    container_id: str,
    pod_netns: str,
    ifname: str = "eth0",
    cni_path: str = CNI_PATH,
) -> dict[str, Any]:
    plugin = os.path.join(cni_path, str(config["type"]))
    if not os.access(plugin, os.X_OK):
        raise LabError(
            f"CNI plugin {plugin} missing; fix: apt-get install -y containernetworking-plugins"
        )
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path(pod_netns),
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
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
