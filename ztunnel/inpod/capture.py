"""In-pod inbound capture: the iptables REDIRECT that sends a pod's inbound plaintext to 15006.

Outbound capture is eBPF (`bpf.loader`, per pod cgroup); inbound is one NAT rule inside the
pod's netns. The rule is ztunnel's in-pod concern, not the BPF module's, so it lives here.
"""

from __future__ import annotations

import os
import subprocess

from mesh.ports import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from mesh.process import EnvironmentUnfit


class CaptureError(EnvironmentUnfit):
    """iptables is missing or refused the rule: the pod's inbound plaintext would bypass us."""


def inbound_rule(
    inbound_port: int = INBOUND_PLAINTEXT_PORT,
    skip: tuple[int, ...] = (HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT),
) -> list[str]:
    """The PREROUTING rule: everything not from lo and not to ztunnel's own ports."""
    return [
        "PREROUTING", "-p", "tcp", "!", "-i", "lo", "-m", "multiport", "!", "--dports",
        ",".join(str(p) for p in skip), "-m", "comment", "--comment", "ambientmesh-inbound",
        "-j", "REDIRECT", "--to-ports", str(inbound_port),
    ]  # fmt: skip


def _iptables(netns_path: str, op: str) -> int:
    cmd = ["nsenter", f"--net={netns_path}", "iptables", "-w", "-t", "nat", op]
    res = subprocess.run(cmd + inbound_rule(), capture_output=True, text=True)
    if res.returncode not in (0, 1):
        raise CaptureError(
            f"iptables in {netns_path} failed: {res.stderr.strip()}; "
            "fix: apt-get install -y iptables"
        )
    return res.returncode


def add_inbound_capture(netns_path: str) -> None:
    """Add the rule once (a restart finds it already there)."""
    if _iptables(netns_path, "-C") != 0 and _iptables(netns_path, "-A") != 0:
        raise CaptureError(f"iptables could not add the inbound rule in {netns_path}")


def remove_inbound_capture(netns_path: str) -> None:
    """Remove every copy of the rule; a netns already gone has nothing to remove."""
    if os.path.exists(netns_path):
        while _iptables(netns_path, "-C") == 0:
            _iptables(netns_path, "-D")
