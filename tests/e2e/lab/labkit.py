"""Helpers for the lab end-to-end tests (a module name of its own, so test files can import it
without guessing which conftest Python finds first)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bpf import syscall
from meshctl.lab.lab import Lab
from meshctl.lab.names import LabPaths
from meshctl.lab.system import netns_list

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh, labels: {app: server}}
spec:
  nodeName: n2
  serviceAccountName: server
  containers: [{name: c, command: [python, -m, mesh.apps.echo, --port, "8080"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh, labels: {app: web}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: mesh, labels: {app: batch}}
spec:
  nodeName: n1
  serviceAccountName: batch
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: plain, labels: {app: client}}
spec:
  nodeName: n1
  containers: [{name: c, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-far, namespace: plain, labels: {app: echo}}
spec:
  nodeName: n2
  containers: [{name: c, command: [python, -m, mesh.apps.echo, --port, "9000"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-near, namespace: plain, labels: {app: echo}}
spec:
  nodeName: n1
  containers: [{name: c, command: [python, -m, mesh.apps.echo, --port, "9000"]}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: mesh}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: plain}
spec:
  clusterIP: 10.96.7.7
  selector: {app: echo}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/batch]}}]}]
"""


def unique_paths() -> LabPaths:
    suffix = secrets.token_hex(2)
    return LabPaths(
        f"am{suffix}",
        state_root=Path(f"/run/ambientmesh-test-{suffix}"),
        cgroup_root=Path(f"/sys/fs/cgroup/unified/ambientmesh-test-{suffix}"),
        pin_root=Path(f"/sys/fs/bpf/ambientmesh-test-{suffix}"),
    )


@dataclass
class Seen:
    """What a lab had while it was up, beyond its names: processes, the host-side links the
    CNI plugins made, and the kernel ids of its pinned BPF programs and maps."""

    pids: list[int] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    bpf: list[tuple[str, int, str]] = field(default_factory=list)  # (kind, id, pin)


def seen(lab: Lab) -> Seen:
    out = Seen()
    if not lab.exists():
        return out
    out.pids = [r.pid for r in lab.state.procs]
    for rec in lab.state.cni:
        for res in rec.results:
            out.links += [str(i["name"]) for i in res.get("interfaces", []) if "sandbox" not in i]
    for d, _dirs, files in os.walk(lab.paths.lab_pins):
        for f in files:
            pin = os.path.join(d, f)
            fd = syscall.obj_get(pin)
            try:
                out.bpf.append(
                    ("prog" if f.startswith("prog_") else "map", syscall.obj_id(fd), pin)
                )
            finally:
                os.close(fd)
    return out


def root_links() -> set[str]:
    text = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in text.splitlines() if ":" in line}


def leftovers(paths: LabPaths, pids: list[int], was: Seen | None = None) -> list[str]:
    """Everything of the lab that still exists; empty means `down` did its job: no netns, no
    cgroups (the parent `ambientmesh*` root too, once the last lab under it is gone), no pins
    and no BPF program or map they held, no links in the root netns, no processes."""
    left = [f"netns {n}" for n in netns_list(paths.prefix)]
    for p in (paths.lab_cgroup, paths.lab_pins, paths.state_dir, paths.state_file,
              paths.cgroup_root, paths.pin_root, paths.state_root):  # fmt: skip
        if p.exists():
            left.append(str(p))
    if was is not None:
        pids = [*pids, *was.pids]
        here = root_links()
        left += [f"link {n}" for n in was.links if n in here]
        left += [f"link {n}" for n in here if n.startswith(paths.prefix)]
        # the kernel frees a program or map once its last pin, attachment and fd are gone,
        # after an RCU grace period: give it a moment
        deadline = time.monotonic() + 5.0
        alive = list(was.bpf)
        while alive and time.monotonic() < deadline:
            alive = [o for o in alive if syscall.exists(o[0], o[1])]
            time.sleep(0.1)
        left += [f"bpf {kind} id {ident} (was {pin})" for kind, ident, pin in alive]
    for pid in pids:
        if os.path.exists(f"/proc/{pid}"):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.append(f"process {pid}")
    return left


def remove_roots(paths: LabPaths) -> None:
    for root in (paths.cgroup_root, paths.pin_root):
        with contextlib.suppress(FileNotFoundError):
            root.rmdir()
    shutil.rmtree(paths.state_root, ignore_errors=True)


LabFactory = Callable[..., Lab]
