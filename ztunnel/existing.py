"""Pods that were running before this ztunnel (or the mesh) was installed on the node.

The CNI plugin enrols a pod when its sandbox is created; a pod created before the plugin was
chained never passes through it, and a pod of a namespace labelled ambient later was refused
while ztunnel was not there to remember it. This module finds such pods from what the node
itself shows, without the container runtime's API:

1. the pod's cgroup: a directory named after the pod UID under the kubelet's `kubepods`
   hierarchy (`.../pod<uid>` with the cgroupfs driver, `...-pod<uid_with_underscores>.slice`
   with systemd). Found by walking the cgroup tree, not from `/proc/<pid>/cgroup`, whose paths
   are relative to the reader's cgroup namespace (a container's own);
2. the pod's netns: that of a process in the pod's cgroup (`cgroup.procs` of it and of its
   container children; ztunnel runs with hostPID so the pids are the node's);
3. where the cgroup layout is unknown (another runtime, the lab), the netns whose local
   addresses include the pod IP (`/proc/<pid>/net/fib_trie`, read without entering it).

The host's own netns never counts (hostNetwork pods are not enrolled), and a persistent netns
path (the runtime's bind mount under /var/run/netns) is preferred to `/proc/<pid>/ns/net`,
which dies with that process. A pod found is handed to the workload manager exactly like a CNI
ADD; one that is not found is retried on later snapshots, with back-off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot
from mesh.config.source import ConfigStore
from ztunnel.inpod import EnrolError, WorkloadManager

log = logging.getLogger("ztunnel.existing")

__all__ = ["ExistingPods", "Sandbox", "find_pod_cgroup", "find_sandbox", "local_ipv4"]

MAX_DEPTH = 6  # kubepods.slice/kubepods-burstable.slice/...-pod<uid>.slice is depth 3


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Where a running pod lives: what a CNI ADD would have told us."""

    netns: str
    cgroup: str | None


def _pod_dir_names(uid: str) -> tuple[str, str]:
    return f"pod{uid}", f"pod{uid.replace('-', '_')}.slice"


def find_pod_cgroup(cgroup_root: str | Path, uid: str) -> Path | None:
    """The pod-level cgroup directory of pod `uid`, if the kubelet made one under the root."""
    if not uid:
        return None
    plain, slice_suffix = _pod_dir_names(uid)
    root = Path(cgroup_root)
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            if e.name == plain or e.name.endswith("-" + slice_suffix):
                return Path(e.path)
            # only the kubelet's hierarchy (and, at the top, anything: some nodes nest it)
            if depth < MAX_DEPTH and (depth == 0 or "kubepods" in e.name or "pod" in d.name):
                stack.append((Path(e.path), depth + 1))
    return None


def _pids_in(cgroup: Path) -> Iterator[int]:
    for d, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            text = Path(d, "cgroup.procs").read_text()
        except OSError:
            continue
        for line in text.split():
            if line.isdigit() and line != "0":  # 0: a pid outside our pid namespace
                yield int(line)


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def local_ipv4(proc_pid: str | Path) -> set[str]:
    """The IPv4 addresses local to a process's netns, from its `net/fib_trie` (a /32 "host
    LOCAL" route exists for every address configured in that namespace)."""
    try:
        lines = Path(proc_pid, "net", "fib_trie").read_text().splitlines()
    except OSError:
        return set()
    out: set[str] = set()
    for prev, line in itertools.pairwise(lines):
        if "/32 host LOCAL" in line and "|--" in prev:
            out.add(prev.split("|--", 1)[1].strip())
    return out


def _persistent_path(key: tuple[int, int], netns_dir: str | Path) -> str | None:
    try:
        names = sorted(os.listdir(netns_dir))
    except OSError:
        return None
    for n in names:
        p = os.path.join(netns_dir, n)
        if _ns_key(p) == key:
            return p
    return None


def find_sandbox(
    pod: Pod,
    *,
    cgroup_root: str | Path = "/sys/fs/cgroup",
    proc: str | Path = "/proc",
    netns_dir: str | Path = "/var/run/netns",
) -> Sandbox | None:
    """Locate a running pod's netns and cgroup, or None (not here, or in the host netns)."""
    # the node's netns: init's and our own (ztunnel runs with hostNetwork)
    host = {_ns_key(f"{proc}/1/ns/net"), _ns_key("/proc/self/ns/net")} - {None}
    cgroup = find_pod_cgroup(cgroup_root, pod.uid)
    candidates: list[tuple[int, tuple[int, int]]] = []
    if cgroup is not None:
        for pid in _pids_in(cgroup):
            key = _ns_key(f"{proc}/{pid}/ns/net")
            if key is not None:
                candidates.append((pid, key))
                break
    elif pod.ip and not ipaddress.ip_address(pod.ip).is_loopback:  # loopback: in every netns
        seen: set[tuple[int, int]] = set()
        try:
            pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
        except OSError:
            pids = []
        for pid in pids:
            key = _ns_key(f"{proc}/{pid}/ns/net")
            if key is None or key in seen or key in host:
                continue
            seen.add(key)
            if pod.ip in local_ipv4(f"{proc}/{pid}"):
                candidates.append((pid, key))
                break
    if not candidates:
        return None
    pid, key = candidates[0]
    if key in host:
        return None  # a hostNetwork pod: nothing to enrol
    netns = _persistent_path(key, netns_dir) or f"{proc}/{pid}/ns/net"
    return Sandbox(netns, str(cgroup) if cgroup is not None else None)


class ExistingPods:
    """Feeds pods the CNI plugin never told us about into the workload manager."""

    def __init__(
        self,
        manager: WorkloadManager,
        *,
        find: Callable[[Pod], Sandbox | None] = find_sandbox,
        retry: float = 10.0,
    ) -> None:
        self.manager = manager
        self.find = find
        self.retry = retry
        self._next_try: dict[str, float] = {}  # pod key -> monotonic time of the next look
        self.adopted: list[str] = []

    def _candidates(self, snap: Snapshot) -> list[Pod]:
        node = self.manager.node.name
        now = time.monotonic()
        for key in [k for k in self._next_try if snap.pod(*k.split("/", 1)) is None]:
            del self._next_try[key]  # deleted meanwhile
        out = []
        for pod in snap.pods_on_node(node):
            if pod.key in self.manager.requests or not snap.is_ambient(pod):
                continue
            if self._next_try.get(pod.key, 0.0) > now:
                continue
            out.append(pod)
        return out

    async def reconcile(self, snap: Snapshot) -> None:
        for pod in self._candidates(snap):
            sandbox = await asyncio.to_thread(self.find, pod)
            if sandbox is None:
                log.debug("pod %s: no running sandbox on this node (yet)", pod.key)
                self._next_try[pod.key] = time.monotonic() + self.retry
                continue
            if pod.key in self.manager.requests:  # the CNI plugin got there meanwhile
                continue
            try:
                enrolled = await self.manager.add(pod.key, sandbox.netns, sandbox.cgroup)
            except EnrolError as exc:
                log.error("existing pod %s: %s", pod.key, exc)
                self._next_try[pod.key] = time.monotonic() + self.retry
                continue
            self._next_try.pop(pod.key, None)
            self.adopted.append(pod.key)
            log.info("existing pod %s found in %s (cgroup %s): enrolled=%s",
                     pod.key, sandbox.netns, sandbox.cgroup, enrolled)  # fmt: skip

    async def run(self, store: ConfigStore) -> None:
        """Look now, on every new snapshot, and every `retry` seconds while some ambient pod
        of this node has not been found."""
        it = store.subscribe().__aiter__()
        snap = store.current
        nxt: asyncio.Task[Snapshot] | None = None
        try:
            while True:
                try:
                    await self.reconcile(snap)
                except Exception:
                    log.exception("looking for existing pods (config version %d)", snap.version)
                if nxt is None:
                    nxt = asyncio.ensure_future(anext(it))
                done, _ = await asyncio.wait({nxt}, timeout=self.retry if self._next_try else None)
                if done:
                    snap, nxt = nxt.result(), None
        finally:
            if nxt is not None:
                nxt.cancel()
