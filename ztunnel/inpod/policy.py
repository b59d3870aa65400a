"""ztunnel's side of kernel-enforced egress policy and kernel-side drops.

The connect4 program decides egress L3/L4 for enrolled pods from maps; this fills them from
each snapshot (`bpf.policy`, as one generation switch), names the policies behind the ids the
kernel reports, and reads the drops the kernel recorded: counters for the metrics (at scrape
time) and events, drained on a timer and once at start, which finds the drops of the time
ztunnel was down (the maps are pinned; a pod's connect then failed with EPERM).

Only bpf(2) and mmap here (`bpf.policy.PolicyMaps`, `bpf.events.DropReader`): no BCC.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bpf.events import REASONS, DropEvent, DropReader
from bpf.policy import PodEgress, PolicyMaps, compile_egress, policy_id
from mesh.config.snapshot import Snapshot
from mesh.metrics import KernelDropCounts
from mesh.netns import NetNs

log = logging.getLogger("ztunnel.policy")

PENDING_GRACE_S = 10.0  # how long a drop waits for its pod to be known again
PENDING_MAX = 4096

SO_NETNS_COOKIE = 71  # Linux 5.14+ (also on the kTLS guest's 6.1)


def netns_cookie(netns: NetNs) -> int:
    """The cookie connect4 reads with bpf_get_netns_cookie: how the maps name a pod."""
    s = netns.new_socket()
    try:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    finally:
        s.close()


def drop_flow_fields(
    ev: DropEvent, node: str, snap: Snapshot, pod_key: str | None, policy: str | None
) -> dict[str, Any]:
    """A kernel drop as the fields of a DROPPED flow (the shared flow record contract), for
    `FlowRing.record(Flow.from_dict(...))`: the lead wires this to the ring once both exist."""
    src = snap.pod(*pod_key.split("/", 1)) if pod_key else None
    dst = snap.pod_by_ip(ev.dst_ip)
    svc = next((s for s in snap.services if s.cluster_ip == ev.dst_ip), None)
    when = datetime.datetime.fromtimestamp(ev.time, datetime.UTC)
    return {
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
        "node": node,
        "reporter": "ztunnel",
        "proxy": f"ztunnel-{node}",
        "source": {
            "namespace": src.namespace if src else None,
            "pod": src.name if src else None,
            "identity": snap.identity(src) if src else None,
            "ip": src.ip if src else None,
            "port": None,
        },
        "destination": {
            "namespace": dst.namespace if dst else None,
            "pod": dst.name if dst else None,
            "identity": snap.identity(dst) if dst else None,
            "ip": ev.dst_ip,
            "port": ev.dst_port,
            "service": f"{svc.name}.{svc.namespace}" if svc else None,
        },
        "protocol": "tcp",
        "l7": None,
        "verdict": "DROPPED",
        "policy": policy,
        "reason": "policy denied" if ev.reason == REASONS[1] else "ztunnel unavailable",
        "mtls": False,
        "duration_ms": 0.0,
        "latency_ms": None,
        "bytes_sent": 0,
        "bytes_received": 0,
    }


class KernelPolicy:
    """The node's policy maps and drop records, under `pin_root` (the loader pinned them)."""

    def __init__(self, pin_root: str, node: str = "") -> None:
        self.node = node
        self.maps = PolicyMaps(pin_root)
        try:
            self.drops = DropReader(pin_root)
        except BaseException:
            self.maps.close()
            raise
        self.names: dict[int, str] = {}  # policy id -> "ns/name", every policy seen
        self.pod_of: dict[int, str] = {}  # netns cookie -> pod key
        self._cookies: dict[NetNs, int] = {}  # by identity: a new sandbox is a new NetNs
        self._lock = threading.Lock()  # apply() runs in a worker thread
        self.on_drop: Callable[[DropEvent, str | None, str | None], None] | None = None
        self._pending: list[tuple[DropEvent, float]] = []  # (event, first seen), pod unknown
        self._last = KernelDropCounts()
        # the last snapshot's compiled pods: enrolling N pods on one snapshot (a restart's
        # restore) compiles each once, not N times
        self._compiled: tuple[Snapshot | None, dict[str, PodEgress | None]] = (None, {})

    def close(self) -> None:
        self.maps.close()
        self.drops.close()

    def policy_name(self, pid: int) -> str:
        return self.names.get(pid, f"policy-{pid:08x}")

    def apply(self, snap: Snapshot, pods: Mapping[str, NetNs]) -> int:
        """Install the egress policy of every enrolled pod (`pods`: key -> its netns) from
        `snap`, as one generation; returns it. Raises `bpf.policy.PolicyMapError` when the
        maps refuse it (the previous generation keeps answering)."""
        with self._lock:
            for np in snap.network_policies:
                self.names[policy_id(f"NetworkPolicy {np.key}")] = np.key
            for cnp in snap.cilium_policies:
                self.names[policy_id(f"CiliumNetworkPolicy {cnp.key}")] = cnp.key
            compiled: dict[int, PodEgress] = {}
            for key, ns in pods.items():
                cookie = self._cookies.get(ns)
                if cookie is None:
                    cookie = self._cookies[ns] = netns_cookie(ns)
                self.pod_of[cookie] = key
                if self._compiled[0] is not snap:
                    self._compiled = (snap, {})
                cache = self._compiled[1]
                if key not in cache:
                    pod = snap.pod(*key.split("/", 1))
                    cache[key] = compile_egress(snap, pod) if pod is not None else None
                eg = cache[key]
                if eg is not None:
                    compiled[cookie] = eg
            live = set(pods.values())
            self._cookies = {k: v for k, v in self._cookies.items() if k in live}
            vips = {s.cluster_ip for s in snap.services if s.cluster_ip and "." in s.cluster_ip}
            gen = self.maps.apply(compiled, vips)
            log.info("egress policy generation %d: %d isolated pod(s)", gen, len(compiled))
            return gen

    def counts(self) -> KernelDropCounts:
        """The kernel's totals, named (for the metrics collector, at scrape time)."""
        try:
            raw = self.drops.counts()
        except OSError as exc:
            log.error("reading the kernel drop counters: %s", exc)
            return self._last
        denied: dict[tuple[str, str], int] = {}
        drops: dict[str, int] = {}
        for (reason, pid), n in raw.items():
            drops[reason] = drops.get(reason, 0) + n
            if reason == REASONS[1]:
                k = (self.policy_name(pid), "egress")
                denied[k] = denied.get(k, 0) + n
        self._last = KernelDropCounts(denied, drops)
        return self._last

    def drain(self) -> list[DropEvent]:
        """Events since the last drain, each logged and handed to `on_drop` (with the pod's key
        and the policy's name when known).

        An event from a netns no pod is known by yet is held back for up to
        `PENDING_GRACE_S`: a restarted ztunnel drains what happened while it was down before
        its pods are enrolled again (the CNI plugin or the state file re-enrols them within
        moments), and a flow that names its pod is worth that short wait."""
        fresh = self.drops.drain()
        now = time.monotonic()
        pending, self._pending = self._pending, []
        ready: list[DropEvent] = []
        for ev, since in [*pending, *((ev, now) for ev in fresh)]:
            if ev.netns_cookie in self.pod_of or now - since >= PENDING_GRACE_S:
                ready.append(ev)
            elif len(self._pending) < PENDING_MAX:
                self._pending.append((ev, since))
            else:
                ready.append(ev)  # never unbounded: past the cap, emit without the pod
        for ev in ready:
            pod = self.pod_of.get(ev.netns_cookie)
            policy = self.policy_name(ev.policy_id) if ev.policy_id else None
            log.info(
                "kernel refused %s -> %s:%d: %s%s", pod or f"netns {ev.netns_cookie}",
                ev.dst_ip, ev.dst_port, ev.reason, f" by {policy}" if policy else "",
            )  # fmt: skip
            if self.on_drop is not None:
                try:
                    self.on_drop(ev, pod, policy)
                except Exception:
                    log.exception("drop event handler")
        return fresh

    async def run(self, interval: float = 1.0) -> None:
        """Drain now (what happened while ztunnel was down), then every `interval` seconds."""
        first = True
        while True:
            with contextlib.suppress(OSError):
                n = len(self.drain())
                if first and n:
                    log.info("%d connect(s) were refused in the kernel before this start", n)
            first = False
            await asyncio.sleep(interval)
