"""Names and paths of everything a lab creates, in one place.

Every name starts with the lab's name and a dash; lab names have no dash of their own, so a
prefix scan for lab `a` can never touch lab `a1`'s or `a-b`'s objects. Kinds get their own
infix (`-node-`, `-pod-`) so a node called like a namespace cannot collide with a pod.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from bpf.mounts import BPFFS_ROOT, default_cgroup_root

LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
DEFAULT_LAB = "lab"
STATE_ROOT = Path("/run/ambientmesh")
# cgroup v2 is at /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one
CGROUP_ROOT = Path(default_cgroup_root()) / "ambientmesh"
PIN_ROOT = Path(BPFFS_ROOT) / "ambientmesh"
NETNS_DIR = Path("/var/run/netns")
CNI_PATH = "/usr/lib/cni"
UNDERLAY_NET = ipaddress.IPv4Network("172.30.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_NET = ipaddress.IPv4Network("10.96.0.0/16")
NODE_BRIDGE = "cni0"  # inside each node netns, made by the CNI bridge plugin
UNDERLAY_BRIDGE = "br0"  # inside the underlay netns


def check_lab_name(name: str) -> str:
    if not LAB_NAME.match(name):
        raise ValueError(
            f"lab name {name!r}: use 1-16 lowercase letters/digits starting with a letter "
            "(no dashes: names of the lab's namespaces start with '<lab>-')"
        )
    return name


@dataclass(frozen=True, slots=True)
class LabPaths:
    """Where one lab keeps its things; roots are overridable so tests stay isolated."""

    lab: str
    state_root: Path = STATE_ROOT
    cgroup_root: Path = CGROUP_ROOT
    pin_root: Path = PIN_ROOT

    @property
    def state_file(self) -> Path:
        return self.state_root / "labs" / f"{self.lab}.json"

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.lab

    @property
    def config_file(self) -> Path:
        return self.state_dir / "config" / "mesh.yaml"

    @property
    def manifest_file(self) -> Path:
        """The operator's manifest as last applied (label edits rewrite this copy)."""
        return self.state_dir / "manifest.yaml"

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def cni_data_dir(self, node: str) -> Path:
        return self.state_dir / "cni" / node

    @property
    def cni_cache_dir(self) -> Path:
        return self.state_dir / "cni-results"

    @property
    def cni_bin_dir(self) -> Path:
        return self.state_dir / "cni-bin"

    def enrol_socket(self, node: str) -> Path:
        return self.state_dir / f"enrol-{node}.sock"

    @property
    def lab_cgroup(self) -> Path:
        return self.cgroup_root / self.lab

    def pod_cgroup(self, namespace: str, pod: str) -> Path:
        return self.lab_cgroup / "pods" / namespace / pod

    def ztunnel_cgroup(self, node: str) -> Path:
        return self.lab_cgroup / "ztunnel" / node

    @property
    def lab_pins(self) -> Path:
        return self.pin_root / self.lab

    @property
    def prefix(self) -> str:
        return f"{self.lab}-"

    @property
    def underlay_netns(self) -> str:
        return f"{self.lab}-underlay"

    def node_netns(self, node: str) -> str:
        return f"{self.lab}-node-{node}"

    def pod_netns(self, namespace: str, pod: str) -> str:
        # namespaces are DNS labels (no dots), so "<ns>.<pod>" is unambiguous
        return f"{self.lab}-pod-{namespace}.{pod}"

    def container_id(self, namespace: str, pod: str) -> str:
        return f"{self.lab}-{namespace}.{pod}"


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def node_ip(index: int) -> str:
    """Node `index` (1-based) on the underlay."""
    return str(UNDERLAY_NET.network_address + index)


def pod_cidr(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.244.{index}.0/24")


def underlay_link(index: int) -> str:
    """The underlay-side end of node `index`'s veth (link names are at most 15 chars)."""
    return f"n{index}"
