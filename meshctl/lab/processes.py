"""The lab's processes: how they are started (this tree's packages, their own session, a log
each), found again by kind and name across commands (PID and start time in the state file),
and how a pod's command is run inside its netns and cgroup (`meshctl.lab.podexec`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mesh.config.snapshot import Snapshot
from meshctl.lab import container
from meshctl.lab.context import LabContext
from meshctl.lab.names import netns_path
from meshctl.lab.state import ProcRecord
from meshctl.lab.system import LabError, log_tail, patience, proc_start_time

REPO_ROOT = Path(__file__).resolve().parents[2]
# the label the waypoint's pod carries (meshctl.lab.waypoints): with --image, run from it
WAYPOINT_LABEL = "gateway.networking.k8s.io/gateway-name"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Children import this tree's packages, never another installed copy."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def resolve_command(cmd: Sequence[str]) -> list[str]:
    """`python`/`python3` in a manifest means this interpreter (the one with our packages)."""
    out = list(cmd)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable
    return out


def podexec_argv(netns: str, cgroup: str, cmd: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshctl.lab.podexec",
        "--netns",
        netns,
        "--cgroup",
        cgroup,
        "--",
        *resolve_command(cmd),
    ]


class Processes:
    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def spawn(self, argv: list[str], log: Path, env: Mapping[str, str]) -> int:
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                start_new_session=True,  # own process group: down signals the whole pod
                cwd=str(self.ctx.paths.state_dir),
            )
        proc.returncode = 0  # we track it by PID from here on; silence Popen's __del__ warning
        return proc.pid

    def find(self, kind: str, name: str) -> ProcRecord | None:
        for r in reversed(self.ctx.state.procs):
            if r.kind == kind and r.name == name:
                return r
        return None

    def start_pod(self, snap: Snapshot, namespace: str, name: str) -> None:
        pod = snap.pod(namespace, name)
        assert pod is not None
        st = self.ctx.state
        info = st.pods[pod.key]
        log = self.ctx.paths.log_dir / f"pod-{namespace}.{name}.log"
        env = {
            "POD_NAME": name,
            "POD_NAMESPACE": namespace,
            "POD_IP": str(info.get("ip", "")),
            "NODE_NAME": str(pod.node),
        }
        img = container.lab_image(st.info)
        if img is not None and WAYPOINT_LABEL in pod.labels:
            # a waypoint from the image, as its Deployment runs it; the runtime puts it in
            # the pod's netns and cgroup (its readiness is what the caller waits for)
            p = self.ctx.paths
            c = container.lab_waypoint(
                img, f"{p.prefix}wp-{namespace}-{name}", pod.command,
                bundle=p.state_dir / "bundles" / f"pod-{namespace}.{name}",
                pod_netns=str(info["netns"]), cgroup=Path(str(info["cgroup"])),
                state_dir=p.state_dir, env=env,
            )  # fmt: skip
            c.delete()
            container.record(st.info, c)
            st.save()
            pid = self.spawn(c.argv(), log, env)
            st.add_proc(ProcRecord("pod", pod.key, pid, proc_start_time(pid) or 0, str(log)))
            return
        pid = self.spawn(podexec_argv(str(info["netns"]), str(info["cgroup"]), pod.command),
                         log, env)  # fmt: skip
        st.add_proc(ProcRecord("pod", pod.key, pid, proc_start_time(pid) or 0, str(log)))
        self._wait_in_pod(pod.key, pid, str(info["netns"]), Path(str(info["cgroup"])), log)

    def _wait_in_pod(self, key: str, pid: int, netns: str, cgroup: Path, log: Path) -> None:
        """`up` returns only once every pod process sits in its cgroup and netns, so callers
        (and enrolment) never race the shim."""
        want = os.stat(netns_path(netns)).st_ino
        deadline = time.monotonic() + patience(15.0)
        while time.monotonic() < deadline:
            try:
                joined = str(pid) in (cgroup / "cgroup.procs").read_text().split()
                inside = os.stat(f"/proc/{pid}/ns/net").st_ino == want
            except OSError:
                raise LabError(f"pod {key} exited at start\n{log_tail(log)}") from None
            if joined and inside:
                return
            time.sleep(0.01)
        raise LabError(
            f"pod {key}: process {pid} never entered its netns and cgroup\n{log_tail(log)}"
        )

    def exec_in_pod(
        self, namespace: str, name: str, cmd: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-off command as part of the pod (its netns and its cgroup)."""
        info = self.ctx.state.pods.get(f"{namespace}/{name}")
        if info is None:
            raise LabError(f"pod {namespace}/{name} is not in lab {self.ctx.paths.lab}")
        env = child_env({"POD_NAME": name, "POD_NAMESPACE": namespace})
        return subprocess.run(
            podexec_argv(str(info["netns"]), str(info["cgroup"]), cmd),
            capture_output=True,
            text=True,
            timeout=patience(timeout),
            env=env,
        )
