"""Helpers for the lab end-to-end tests (a module name of its own, so test files can import it
without guessing which conftest Python finds first)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

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


def leftovers(paths: LabPaths, pids: list[int]) -> list[str]:
    """Everything of the lab that still exists; empty means `down` did its job."""
    left = [f"netns {n}" for n in netns_list(paths.prefix)]
    for p in (paths.lab_cgroup, paths.lab_pins, paths.state_dir, paths.state_file):
        if p.exists():
            left.append(str(p))
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
