"""Finding the sandboxes of pods that were already running on this node when ztunnel (or the
mesh) was installed, so that they are enrolled too, without a pod restart.

The CNI plugin tells ztunnel about every pod created after the install; nobody tells it about
the pods before. The kubelet's runtime puts each pod in a cgroup whose path carries the pod's
UID (`.../pod<uid>/...` with the cgroupfs driver, `...-pod<uid_with_underscores>.slice/...`
with systemd), and every container of the pod shares the sandbox's netns. So: the oldest
process whose cgroup names the UID is the sandbox (pause) process; its `/proc/<pid>/ns/net` is
the pod's netns, and the pod-level cgroup directory is where the redirect programs go (they
apply to every container below it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mesh.config.snapshot import Snapshot
from ztunnel.inpod.workloadmanager import EnrolError, WorkloadManager

log = logging.getLogger("ztunnel.discover")


@dataclass(frozen=True)
class Sandbox:
    pid: int
    netns: str
    cgroup: str


def _needles(uid: str) -> tuple[str, str]:
    return (f"pod{uid}", f"pod{uid.replace('-', '_')}")


def find_pod_cgroup(
    uid: str, cgroup_root: str = "/sys/fs/cgroup", max_depth: int = 6
) -> str | None:
    """The pod-level cgroup directory of the pod with `uid`, found by walking the cgroup mount.
    Needed where /proc/<pid>/cgroup cannot be trusted: in a container with a private cgroup
    namespace those paths are relative to the container's own cgroup (they start with `..`),
    and a process sees itself at `/`."""
    if not uid:
        return None
    needles = _needles(uid)
    base = cgroup_root.rstrip("/").count("/")
    for d, dirs, _ in os.walk(cgroup_root):
        for name in dirs:
            if any(n in name for n in needles):
                return os.path.join(d, name)
        if d.count("/") - base >= max_depth:
            dirs.clear()
    return None


def _start_time(proc_root: str, pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); the command may hold spaces."""
    with open(f"{proc_root}/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def sandbox_of(
    uid: str, *, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup"
) -> Sandbox | None:
    """The running sandbox of the pod with `uid`, or None when none of its processes runs."""
    if not uid:
        return None
    needles = _needles(uid)
    best: tuple[int, int, str] | None = None  # (start time, pid, pod cgroup)
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/cgroup") as f:
                text = f.read()
            line = next((x for x in text.splitlines() if x.startswith("0::")), None)
            if line is None:
                continue
            parts = line[3:].strip().strip("/").split("/")
            at = next((i for i, p in enumerate(parts) if any(n in p for n in needles)), None)
            if at is None:
                continue
            pid = int(entry.name)
            started = _start_time(proc_root, pid)
        except (OSError, ValueError, IndexError):
            continue  # the process went away meanwhile, or is not readable
        pod_parts = parts[: at + 1]
        cgroup = os.path.join(cgroup_root, *pod_parts)
        if ".." in pod_parts:  # a private cgroup namespace: the path is not ours to join
            cgroup = find_pod_cgroup(uid, cgroup_root) or cgroup
        cand = (started, pid, cgroup)
        if best is None or cand < best:
            best = cand
    if best is None:
        return None
    _, pid, cgroup = best
    return Sandbox(pid, f"{proc_root}/{pid}/ns/net", cgroup)


class Discoverer:
    """On every snapshot, look once for the sandbox of each pod on this node that nobody has
    announced, and ask the workload manager to take it (it enrols the ambient ones and keeps
    the others, so a label added later enrols them live)."""

    def __init__(
        self,
        manager: WorkloadManager,
        *,
        find: Callable[[str], Sandbox | None] = sandbox_of,
    ) -> None:
        self.manager = manager
        self.find = find
        self._looked: set[str] = set()  # UIDs already searched: new pods come through CNI

    async def sweep(self, snap: Snapshot) -> int:
        """Returns how many pods it handed to the manager."""
        handed = 0
        for pod in snap.pods_on_node(self.manager.node.name):
            if not pod.uid or pod.uid in self._looked or pod.key in self.manager.requests:
                continue
            self._looked.add(pod.uid)
            box = await asyncio.to_thread(self.find, pod.uid)
            if box is None:
                continue
            try:
                enrolled = await self.manager.add(pod.key, box.netns, box.cgroup)
            except EnrolError as exc:
                log.error("pod %s found running (pid %d) but not enrolled: %s", pod.key,
                          box.pid, exc)  # fmt: skip
                continue
            handed += 1
            log.info("pod %s was running before us (sandbox pid %d): %s", pod.key, box.pid,
                     "enrolled" if enrolled else "known, not ambient")  # fmt: skip
        return handed

    async def run(self, snapshots: Callable[[], AsyncIterator[Snapshot]]) -> None:
        async for snap in snapshots():
            try:
                await self.sweep(snap)
            except Exception:
                log.exception("looking for running pods (config version %d)", snap.version)
