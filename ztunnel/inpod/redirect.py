"""Wiring the BPF redirector for one node's ztunnel (`--redirect bpf`).

Several ztunnels can share a machine (the lab runs one per node), each loading its own copy of
the programs with its own maps. So nothing may be attached where another node's programs would
be replaced or would shadow ours:
- pins live under `<pin root>/<node>`: two ztunnels never race to pin the same map;
- `getsockopt` (answers SO_ORIGINAL_DST) goes on *this ztunnel's own* cgroup, which is where
  its accepted sockets are accounted;
- `sockops` (moves the remembered destination from the app socket to its address) goes on
  each enrolled pod's cgroup, beside connect4/getpeername4 and connect6/getpeername6, at
  enrolment.
Nothing is attached to the cgroup root, where it would catch every process on the machine.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mesh.process import EnvironmentUnfit
from ztunnel.inpod.capture import add_inbound_capture, remove_inbound_capture

log = logging.getLogger("ztunnel.redirect")


def own_cgroup(root: str, proc_cgroup: str = "/proc/self/cgroup") -> str:
    """This process's cgroup v2 directory (the `0::` line), under `root`.

    In a Kubernetes pod with a private cgroup namespace the line reads `0::/` although the
    pod's cgroup is deep in the host's tree: then the pod's own directory is found by its UID
    (`POD_UID`, from the downward API) in the host's cgroup mount."""
    for line in Path(proc_cgroup).read_text().splitlines():
        if line.startswith("0::"):
            path = os.path.join(root, line[3:].strip().lstrip("/")).rstrip("/") or root
            if os.path.realpath(path) == os.path.realpath(root) and os.environ.get("POD_UID"):
                from ztunnel.inpod.discover import find_pod_cgroup

                return find_pod_cgroup(os.environ["POD_UID"], root) or path
            return path
    raise EnvironmentUnfit(f"{proc_cgroup} has no cgroup v2 entry")


class NodeRedirector:
    """`ztunnel.inpod.workloadmanager.Redirector` on top of `bpf.loader.BpfRedirector`."""

    def __init__(
        self, node: str, pin_root: str | None = None, ztunnel_cgroup: str | None = None
    ) -> None:
        from bpf.loader import DEFAULT_PIN_ROOT, BpfRedirector
        from bpf.mounts import ensure_cgroup2

        root, done = ensure_cgroup2()
        for what in done:
            log.info("%s (nothing was mounted there)", what)
        self.cgroup = ztunnel_cgroup or own_cgroup(root)
        if not ztunnel_cgroup and os.path.realpath(self.cgroup) == os.path.realpath(root):
            raise EnvironmentUnfit(
                "ztunnel runs in the root cgroup: its SO_ORIGINAL_DST program would apply to "
                "every process; run it in a cgroup of its own or pass --bpf-cgroup"
            )
        self.pin_root = os.path.join(pin_root or DEFAULT_PIN_ROOT, node)
        self.bpf: Any = BpfRedirector(pin_root=self.pin_root, ztunnel_cgroup=self.cgroup)
        self.node = node
        # egress policy maps and kernel drop records, opened once the loader pinned them
        self.policy: Any = None

    def install(self) -> None:
        """Compile and pin in a child process (BCC's LLVM never enters ztunnel: ~100 MiB of
        RSS saved for the process's life), then attach the pinned programs here."""
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        res = subprocess.run(
            [sys.executable, "-m", "bpf.loader", "load", "--pin-root", self.pin_root],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if res.returncode != 0:
            from bpf.loader import BpfUnavailable

            raise BpfUnavailable(res.stderr.strip().splitlines()[-1] if res.stderr else "failed")
        for line in res.stderr.splitlines():  # e.g. that it mounted bpffs first
            log.info("%s", line)
        self.bpf.open_pinned()
        self.bpf.attach_node()
        from ztunnel.inpod.policy import KernelPolicy

        self.policy = KernelPolicy(self.pin_root, self.node)
        log.info("redirect programs loaded (pins %s, cgroup %s)", self.pin_root, self.cgroup)

    def enrol(self, cgroup_path: str, netns_path: str) -> None:
        self.bpf.enrol(cgroup_path)
        add_inbound_capture(netns_path)

    def unenrol(self, cgroup_path: str, netns_path: str) -> None:
        self.bpf.unenrol(cgroup_path)
        remove_inbound_capture(netns_path)
