"""In-pod mode: per enrolled pod, ztunnel's listeners live inside the pod's network namespace.

For each pod enrolled on this node the workload manager opens, inside the pod's netns:
15001 outbound (on 127.0.0.1, where the pod's redirected connects land, and on the pod IP),
15006 inbound plaintext and 15008 inbound HBONE (on 0.0.0.0, presenting the pod's own
certificate). The sockets are created by this process, which is in no pod's cgroup, so the
pod's redirect programs never see them. They are also registered with the node as ztunnel's
own (`Node.add_listeners`): a pod that *asks* for one of them (connects to 127.0.0.1:15001,
or its own IP:15006, directly or through HBONE) is refused instead of looping.

Enrolment is requested (by the CNI plugin or the lab) with the pod's netns and cgroup paths;
whether the pod is *in the mesh* is the snapshot's call. A requested pod is enrolled while the
snapshot says it is ambient and unenrolled as soon as a snapshot says it is not (a label
removed live), keeping the request, so a label put back enrols it again without anyone asking.
`remove` forgets the pod: listeners close (live connections drain on their own), redirection
is undone. When ztunnel stops, redirection stays in place on purpose: the pods fail closed.

The requests are also written to a state file (`state_path`), so that a restarted ztunnel (an
upgrade, a crash) re-enrols every pod it served without the CNI plugin running again: on a
real node nobody else would tell it about pods created before the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mesh.config.model import Pod
from mesh.config.snapshot import Snapshot
from mesh.hbone import serve
from mesh.hbone.pool import Listener
from mesh.netns import NetNs, NetNsError
from mesh.ports import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from ztunnel.proxy.inbound import InboundHbone
from ztunnel.proxy.inbound_plaintext import InboundPlaintext
from ztunnel.proxy.node import Node
from ztunnel.proxy.outbound import LiveOutbound, Outbound

log = logging.getLogger("ztunnel.inpod")


class Redirector(Protocol):
    """Steers an enrolled pod's traffic into its in-pod listeners (bpf.loader.BpfRedirector).
    Both calls are idempotent and may block briefly (they run in a worker thread)."""

    def enrol(self, cgroup_path: str, netns_path: str) -> None: ...

    def unenrol(self, cgroup_path: str, netns_path: str) -> None: ...


class EgressPolicy(Protocol):
    """Fills the kernel's egress policy maps (ztunnel.inpod.policy.KernelPolicy). `apply` may
    block (it runs in a worker thread) and raises OSError when the maps refuse the policy."""

    def apply(self, snap: Snapshot, pods: dict[str, NetNs]) -> int: ...


class EnrolError(Exception):
    """An enrolment that cannot be done; the message names the pod and the reason."""


@dataclass(frozen=True)
class PodRequest:
    """What the CNI plugin / lab told us about a pod: where its netns and cgroup are."""

    key: str
    netns_path: str
    cgroup_path: str | None


@dataclass
class InPod:
    """One enrolled pod: the netns handle and the listeners opened inside it."""

    request: PodRequest
    netns: NetNs
    identity: str
    ip: str | None
    servers: list[Listener] = field(default_factory=list)

    def ports(self) -> list[str]:
        out = []
        for s in self.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"{host}:{port}")
        return out


class WorkloadManager:
    def __init__(
        self,
        node: Node,
        redirector: Redirector | None = None,
        *,
        refresh: Callable[[], Awaitable[object]] | None = None,
        wait_timeout: float = 5.0,
        outbound_port: int = OUTBOUND_PORT,
        plaintext_port: int = INBOUND_PLAINTEXT_PORT,
        hbone_port: int = HBONE_PORT,
        state_path: str | Path | None = None,
        policy: EgressPolicy | None = None,
    ) -> None:
        self.node = node
        self.policy = policy
        # enrolled pods' outbound connections, closed when a snapshot's policies deny them
        self.live = LiveOutbound()
        self.state_path = Path(state_path) if state_path is not None else None
        self.redirector = redirector
        self.refresh = refresh
        self.wait_timeout = wait_timeout
        self.ports = (outbound_port, plaintext_port, hbone_port)
        self.requests: dict[str, PodRequest] = {}
        self.enrolled: dict[str, InPod] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        node.netns_of = self.netns_of

    def netns_of(self, pod_key: str) -> NetNs | None:
        pod = self.enrolled.get(pod_key)
        return pod.netns if pod is not None else None

    # -- requests --------------------------------------------------------------------------

    async def add(self, key: str, netns_path: str, cgroup_path: str | None) -> bool:
        """Record the request and enrol if the snapshot says the pod is ambient on this node.
        A pod the snapshot does not know yet is waited for (briefly): the CNI plugin runs
        right after the pod is scheduled, and config may trail by a moment. Returns whether
        the pod is enrolled now."""
        ns, sep, name = key.partition("/")
        if not sep or not ns or not name:
            raise EnrolError(f"pod {key!r}: expected namespace/name")
        req = PodRequest(key, netns_path, cgroup_path)
        async with self._lock:
            old = self.requests.get(key)
            if old is not None and old != req and key in self.enrolled:
                await self._unenrol(key)  # same pod name, new sandbox: start over
            self.requests[key] = req
            await self._save()
        pod = await self._wait_for(key)
        async with self._lock:
            if self.requests.get(key) != req:
                raise EnrolError(f"pod {key}: removed while it was being enrolled")
            if pod is None or not self._wanted(self.node.snapshot(), pod):
                return False
            await self._enrol(req, self.node.snapshot())
            return True

    async def remove(self, key: str) -> bool:
        """Forget a pod (deleted, or taken out by its owner). Returns whether it was known."""
        async with self._lock:
            known = self.requests.pop(key, None) is not None
            if key in self.enrolled:
                await self._unenrol(key)
                known = True
            if known:
                await self._save()
            return known

    # -- the state file --------------------------------------------------------------------

    async def _save(self) -> None:
        """Write the requests atomically (rename), so a crash never leaves half a file."""
        if self.state_path is None:
            return
        rows = [
            {"pod": r.key, "netns": r.netns_path, "cgroup": r.cgroup_path}
            for r in sorted(self.requests.values(), key=lambda r: r.key)
        ]
        path = self.state_path

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.error("could not write enrolment state %s: %s", path, exc)

    async def restore(self) -> int:
        """Re-request every pod a previous ztunnel served whose netns still exists; a pod
        deleted meanwhile is dropped. A damaged file is reported and ignored (the CNI plugin
        and the lab can still enrol). Returns how many pods were enrolled."""
        if self.state_path is None:
            return 0
        try:
            rows = json.loads(await asyncio.to_thread(self.state_path.read_text))
            if not isinstance(rows, list):
                raise ValueError("not a JSON list")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.error("ignoring enrolment state %s: %s", self.state_path, exc)
            return 0
        enrolled = 0
        for row in rows:
            try:
                key, netns, cgroup = row["pod"], row["netns"], row.get("cgroup")
                if not (isinstance(key, str) and isinstance(netns, str)):
                    raise TypeError("pod and netns must be strings")
            except (KeyError, TypeError, AttributeError) as exc:
                log.error("ignoring enrolment state entry %r: %s", row, exc)
                continue
            if not await asyncio.to_thread(os.path.exists, netns):
                log.info("pod %s is gone (no %s): not restoring it", key, netns)
                continue
            try:
                enrolled += await self.add(key, netns, cgroup if isinstance(cgroup, str) else None)
            except EnrolError as exc:
                log.error("restoring %s: %s", key, exc)
        await self._save()  # drop what is gone
        log.info("restored enrolment of %d pod(s) from %s", enrolled, self.state_path)
        return enrolled

    async def _wait_for(self, key: str) -> Pod | None:
        ns, _, name = key.partition("/")
        snap = self.node.snapshot()
        pod = snap.pod(ns, name)
        if pod is not None and self._wanted(snap, pod):
            return pod
        if self.refresh is not None:
            with contextlib.suppress(Exception):  # a bad config is logged by its source
                await self.refresh()
            snap = self.node.snapshot()
            pod = snap.pod(ns, name)
            if pod is not None:
                return pod
        if pod is not None:
            return pod  # known and not ambient: enrolled later if a label changes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while pod is None and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            pod = self.node.snapshot().pod(ns, name)
        return pod

    def _wanted(self, snap: Snapshot, pod: Pod) -> bool:
        return snap.is_ambient(pod) and (pod.node is None or pod.node == self.node.name)

    # -- snapshots -------------------------------------------------------------------------

    async def reconcile(self, snap: Snapshot) -> None:
        """Bring enrolment in line with a new snapshot: unenrol pods that left the mesh (or
        this node), enrol requested pods that joined it."""
        self._changed.set()
        async with self._lock:
            for key in list(self.enrolled):
                pod = snap.pod(*key.split("/", 1))
                if pod is None or not self._wanted(snap, pod):
                    log.info("pod %s is no longer ambient here: unenrolling", key)
                    await self._unenrol(key)
                elif (
                    pod.ip != self.enrolled[key].ip
                    or snap.identity(pod) != self.enrolled[key].identity
                ):
                    log.info("pod %s changed address or identity: re-enrolling", key)
                    await self._unenrol(key)
            for key, req in list(self.requests.items()):
                if key in self.enrolled:
                    continue
                pod = snap.pod(*key.split("/", 1))
                if pod is not None and self._wanted(snap, pod):
                    try:
                        await self._enrol(req, snap)
                    except EnrolError as exc:
                        log.error("%s", exc)
            try:
                await self._apply_policy(snap)
            except OSError as exc:
                log.error("egress policy of config version %d not installed: %s", snap.version, exc)
            closed = self.live.enforce(snap)
            if closed:
                log.info("closed %d connection(s) the new policy denies", closed)

    async def _apply_policy(self, snap: Snapshot, adding: InPod | None = None) -> None:
        """Install the egress policy of every enrolled pod (and of `adding`, before its
        redirection is attached: a pod is never redirected without its policy)."""
        if self.policy is None:
            return
        pods = {k: p.netns for k, p in self.enrolled.items()}
        if adding is not None:
            pods[adding.request.key] = adding.netns
        await asyncio.to_thread(self.policy.apply, snap, pods)

    async def run(self, snapshots: Callable[[], Any]) -> None:
        """Reconcile on every snapshot from `snapshots()` (an async iterator), forever."""
        async for snap in snapshots():
            try:
                await self.reconcile(snap)
            except Exception:
                log.exception("reconciling enrolment with config version %d", snap.version)

    # -- the work --------------------------------------------------------------------------

    async def _enrol(self, req: PodRequest, snap: Snapshot) -> None:
        if req.key in self.enrolled:
            return
        pod = snap.pod(*req.key.split("/", 1))
        assert pod is not None
        identity = snap.identity(pod)
        try:
            netns = NetNs(req.netns_path)
        except NetNsError as exc:
            raise EnrolError(f"pod {req.key}: {exc.strerror}") from None
        inpod = InPod(req, netns, identity, pod.ip)
        try:
            await self.node.identities.ensure(identity)
            await self._open_listeners(inpod)
            await self._apply_policy(snap, inpod)
            if self.redirector is not None and req.cgroup_path:
                await asyncio.to_thread(self.redirector.enrol, req.cgroup_path, req.netns_path)
            elif self.redirector is not None:
                raise EnrolError(f"pod {req.key}: no cgroup given, cannot redirect its traffic")
        except BaseException as exc:
            await _close_servers(inpod.servers)
            self.node.forget_listeners(netns)
            netns.close()
            if isinstance(exc, EnrolError | asyncio.CancelledError):
                raise
            raise EnrolError(f"pod {req.key}: {exc}") from exc
        self.enrolled[req.key] = inpod
        log.info("enrolled %s (%s) listening on %s", req.key, identity, ", ".join(inpod.ports()))

    async def _open_listeners(self, inpod: InPod) -> None:
        node, key, ns = self.node, inpod.request.key, inpod.netns
        out_port, plain_port, hbone_port = self.ports
        loop = asyncio.get_running_loop()
        outbound = Outbound(node, pod_key=key, netns=ns)
        outbound.live = self.live
        hosts = ["127.0.0.1"] + ([inpod.ip] if inpod.ip else [])
        for host in hosts:
            sock = ns.listen(host, out_port)
            inpod.servers.append(await loop.create_server(outbound.protocol, sock=sock))
        plain = InboundPlaintext(node, pod_key=key, netns=ns)
        sock = ns.listen("0.0.0.0", plain_port)
        inpod.servers.append(await loop.create_server(plain.protocol, sock=sock))
        sock = ns.listen("0.0.0.0", hbone_port)
        inpod.servers.append(
            await serve(
                "",
                0,
                node.identities.listener_context(inpod.identity),
                InboundHbone(node, pod_key=key, netns=ns),
                trust_domain=node.trust_domain,
                sock=sock,
                limits=node.limits,
                gate=node.gate,
                on_refused=node.hbone_refused,
            )
        )
        for srv in inpod.servers:
            node.add_listeners(ns, srv.sockets, addrs=[inpod.ip] if inpod.ip else [])

    async def _unenrol(self, key: str) -> None:
        inpod = self.enrolled.pop(key, None)
        if inpod is None:
            return
        req = inpod.request
        try:
            if self.redirector is not None and req.cgroup_path:
                await asyncio.to_thread(self.redirector.unenrol, req.cgroup_path, req.netns_path)
        except Exception as exc:
            log.error("pod %s: undoing redirection failed: %s", key, exc)
        finally:
            await _close_servers(inpod.servers)
            self.node.forget_listeners(inpod.netns)
            inpod.netns.close()
            log.info("unenrolled %s", key)

    async def close(self) -> None:
        """Stop listening in every pod, leaving redirection in place (pods fail closed)."""
        async with self._lock:
            for inpod in self.enrolled.values():
                await _close_servers(inpod.servers)
                self.node.forget_listeners(inpod.netns)
                inpod.netns.close()
            self.enrolled.clear()

    def dump(self) -> list[dict[str, object]]:
        return [
            {
                "pod": key,
                "enrolled": key in self.enrolled,
                "netns": req.netns_path,
                "cgroup": req.cgroup_path,
                "identity": self.enrolled[key].identity if key in self.enrolled else None,
                "listeners": self.enrolled[key].ports() if key in self.enrolled else [],
            }
            for key, req in sorted(self.requests.items())
        ]


async def _close_servers(servers: list[Listener]) -> None:
    for s in servers:
        s.close()
    for s in servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.wait_closed(), 1.0)
    servers.clear()


__all__ = [
    "EgressPolicy",
    "EnrolError",
    "InPod",
    "PodRequest",
    "Redirector",
    "WorkloadManager",
]
