"""What the node proxy's roles share: the node, its config, identities, pool and telemetry.

Also the plumbing every role needs: where a redirected connection was going (`original_dst`)
and joining two endpoints with their telemetry (`splice`, with `mesh.telemetry.Accounting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mesh.accesslog import AccessRecord, log_access
from mesh.authz import AuthzRequest, authorize
from mesh.config.model import MtlsMode
from mesh.config.snapshot import PolicySet, Snapshot
from mesh.flows import REASONS, Flow, FlowRing
from mesh.hbone.limits import ConnectionGate, HboneLimits
from mesh.hbone.pool import CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_STREAM_CAP, HbonePool
from mesh.identity.manager import Identities
from mesh.identity.spiffe import node_id
from mesh.ingress_policy import EgressIsolation, IngressPolicy
from mesh.metrics import MeshMetrics
from mesh.netns import NetNs, connect_in
from mesh.netpolicy import Decision, Verdict
from mesh.ports import HBONE_PORT
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint
from mesh.telemetry import Accounting

if TYPE_CHECKING:
    from ztunnel.proxy.fastpath import FastPath

log = logging.getLogger("ztunnel")

SO_ORIGINAL_DST = 80
DEFAULT_MAX_PENDING_DIALS = 1024
_ANY = ("0.0.0.0", "::")


class DialRefused(Exception):
    """A dial ztunnel will not make. `reason` labels the metric, `flag` is the access log's
    response flag (Istio's names), `status` the HBONE answer when the dial was for a CONNECT."""

    def __init__(self, message: str, *, reason: str, flag: str, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.flag = flag
        self.status = status


@dataclass(frozen=True, slots=True)
class OwnListener:
    """One of ztunnel's listening sockets: where it is (netns key: the namespace's inode, 0
    for ztunnel's own), and whether what it accepts is proxied onward (15001/15006/15008:
    dialing one of those is a loop) or answered locally (admin, metrics, readiness)."""

    netns: int
    host: str
    port: int
    forwarding: bool


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination an app connected to before redirect (BPF getsockopt or netfilter)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def _no_netns(_pod_key: str) -> NetNs | None:
    return None


@dataclass(frozen=True, slots=True, eq=False)
class LiveInbound:
    """An inbound connection being served, with the facts its ingress decision was made on,
    so a policy change can decide it again (`Node.revalidate_inbound`)."""

    src_ip: str
    dst_ip: str
    dst_port: int
    authenticated: bool
    via_waypoint: bool
    down: Endpoint
    up: Endpoint
    # the AuthorizationPolicy facts it was admitted on (None: plaintext, no identity)
    principal: str | None = None
    src_namespace: str | None = None


@dataclass
class Node:
    """One ztunnel: its name, the current snapshot, identities, HBONE pool and telemetry.

    `netns_of(pod_key)` answers the network namespace of a pod enrolled on this ztunnel (the
    workload manager fills it in), so inbound traffic is delivered from inside the pod."""

    name: str
    snapshot: Callable[[], Snapshot]
    identities: Identities
    metrics: MeshMetrics
    trust_domain: str = "cluster.local"
    hbone_port: int = HBONE_PORT
    stream_cap: int = DEFAULT_STREAM_CAP
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    netns_of: Callable[[str], NetNs | None] = _no_netns
    limits: HboneLimits = field(default_factory=HboneLimits)
    max_pending_dials: int = DEFAULT_MAX_PENDING_DIALS
    ingress_policy: IngressPolicy = field(default_factory=IngressPolicy)
    egress_isolation: EgressIsolation = field(default_factory=EgressIsolation)
    live_inbound: set[LiveInbound] = field(default_factory=set, init=False)
    flows: FlowRing | None = None  # the recent flows (`/flows`); None: not recorded
    fastpath: FastPath | None = None  # same-node sockmap splice (`--fastpath`); None: off
    # meshed same-node connections skip HBONE (`ztunnel.proxy.local`; `--local-delivery`)
    local_delivery: bool = True
    pool: HbonePool = field(init=False)
    gate: ConnectionGate = field(init=False)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    pending_dials: int = field(default=0, init=False)
    # (netns key) -> ztunnel's listeners there, and the addresses we know are local there
    listeners: dict[int, set[OwnListener]] = field(default_factory=dict, init=False)
    local_addrs: dict[int, set[str]] = field(default_factory=dict, init=False)
    listen_ports: frozenset[int] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        self.pool = HbonePool(
            self.identities.client_context_async,
            trust_domain=self.trust_domain,
            stream_cap=self.stream_cap,
            idle_timeout=self.idle_timeout,
            connect_timeout=self.connect_timeout,
        )
        self.gate = ConnectionGate(self.limits)

    @property
    def identity(self) -> str:
        return node_id(self.trust_domain, self.name)

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        """Tasks are owned here and cancelled on shutdown: none is fire-and-forget."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug in one connection's handling; contained to it, but never silent.
            log.error("connection task failed", exc_info=task.exception())

    async def drain(self, grace: float) -> int:
        """Let live connections finish for up to `grace` s, then cut the rest; returns how
        many were cut."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        left = list(self.tasks)
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)
        self.pool.close()
        return len(left)

    async def connect_tcp(self, ip: str, port: int, netns: NetNs | None) -> TcpEndpoint:
        """A plain TCP connection, from inside `netns` when given (an enrolled pod's). Never
        to one of our own listeners (see `self_target`), and only while fewer than
        `max_pending_dials` dials are under way: raises DialRefused otherwise."""
        self.check_not_self(ip, port, netns)
        with self.dial_slot():
            proto = await connect_in(
                netns, TcpEndpoint, ip, port, connect_timeout=self.connect_timeout
            )
        assert isinstance(proto, TcpEndpoint)
        return proto

    # -- guards ----------------------------------------------------------------------------

    def ingress_denied(
        self,
        snap: Snapshot,
        src_ip: str,
        dst_ip: str,
        dst_port: int,
        *,
        authenticated: bool,
        via_waypoint: bool,
    ) -> Decision | None:
        """The NetworkPolicy/CiliumNetworkPolicy denial of an inbound connection, counted;
        None when those policies allow it. Asked before the upstream dial, so a denied peer
        never makes the application accept a connection.

        A connection admitted only by HTTP rules (`ALLOW_L7`) is let through only when it
        came through the destination's waypoint, which checks each request: delivered
        straight to the pod (plaintext, or HBONE that bypassed the waypoint) those rules
        would be enforced by no one."""
        d = self.ingress_policy.check(snap, src_ip, dst_ip, dst_port, authenticated=authenticated)
        if d is None or d.verdict is Verdict.ALLOW:
            return None
        if d.verdict is Verdict.ALLOW_L7:
            if via_waypoint:
                return None
            d = Decision(
                Verdict.DENY,
                d.policy,
                "only HTTP rules allow this, and it did not come through the waypoint",
            )
        self.metrics.policy_denied(d.policy or "-", "ingress", "ztunnel")
        return d

    @contextlib.contextmanager
    def serving_inbound(self, conn: LiveInbound) -> Iterator[None]:
        """Registers a delivered inbound connection while it lives."""
        self.live_inbound.add(conn)
        try:
            yield
        finally:
            self.live_inbound.discard(conn)

    def revalidate_inbound(self, snap: Snapshot) -> int:
        """Decide every live inbound connection again under `snap` and cut (reset both ends)
        those it no longer allows: NetworkPolicy/CNP, AuthorizationPolicy (L4, from the
        identity the connection was admitted with) and, for plaintext, PeerAuthentication
        STRICT. Istio's ztunnel does the same when its policies change: a policy written to
        stop a peer must stop the peer's open connections too, not only its next ones.
        Returns how many were cut."""
        cut = 0
        policies: dict[str, PolicySet] = {}  # per destination pod, once per pass: the
        # selector scan costs as much as at accept, and a node may hold thousands of these
        for c in list(self.live_inbound):
            why = self._no_longer_allowed(snap, c, policies)
            if why is None:
                continue
            log.info("closing %s -> %s:%s: no longer allowed: %s",
                     c.src_ip, c.dst_ip, c.dst_port, why)  # fmt: skip
            self.live_inbound.discard(c)
            c.down.abort()
            c.up.abort()
            cut += 1
        return cut

    def _no_longer_allowed(
        self, snap: Snapshot, c: LiveInbound, policies: dict[str, PolicySet]
    ) -> str | None:
        d = self.ingress_denied(
            snap, c.src_ip, c.dst_ip, c.dst_port,
            authenticated=c.authenticated, via_waypoint=c.via_waypoint,
        )  # fmt: skip
        if d is not None:
            return f"{d.policy}: {d.reason}"
        pod = snap.pod_by_ip(c.dst_ip)
        if pod is None:  # gone from the snapshot: its own teardown closes what it served
            return None
        if not c.authenticated and snap.mtls_mode(pod, c.dst_port) is MtlsMode.STRICT:
            return "PeerAuthentication STRICT"
        pols = policies.get(pod.key)
        if pols is None:
            pols = policies[pod.key] = snap.policies_for(pod)
        req = AuthzRequest(c.principal, c.src_namespace, c.src_ip, c.dst_port)
        decision = authorize(pols, req, l7=False)
        if decision.allowed:
            return None
        return f"{decision.policy or 'AuthorizationPolicy'}: {decision.reason}"

    async def revalidate_on_change(self, snapshots: Callable[[], AsyncIterator[Snapshot]]) -> None:
        """Runs for ztunnel's lifetime: each new snapshot re-decides the live inbound
        connections (a few dict lookups each when no policy applies to their destination)."""
        async for snap in snapshots():
            if self.live_inbound:
                self.revalidate_inbound(snap)

    @contextlib.contextmanager
    def dial_slot(self) -> Iterator[None]:
        """A pending upstream dial (TCP or HBONE), within `max_pending_dials`."""
        if self.pending_dials >= self.max_pending_dials:
            self.metrics.refused("pending_dials")
            raise DialRefused(
                f"{self.pending_dials} upstream dials pending (limit {self.max_pending_dials})",
                reason="pending_dials", flag="UO", status=503,
            )  # fmt: skip
        self.pending_dials += 1
        try:
            yield
        finally:
            self.pending_dials -= 1

    def add_listeners(
        self,
        netns: NetNs | None,
        socks: Iterable[socket.socket],
        *,
        forwarding: bool = True,
        addrs: Iterable[str] = (),
    ) -> None:
        """Remember listening sockets as ours; `addrs` are addresses local to that netns (a
        pod's IP) that a wildcard bind there answers on."""
        key = netns.inode if netns is not None else 0
        mine = self.listeners.setdefault(key, set())
        for sock in socks:
            host, port = sock.getsockname()[:2]
            mine.add(OwnListener(key, host, port, forwarding))
        self.local_addrs.setdefault(key, set()).update(addrs)
        self._index_ports()

    def forget_listeners(self, netns: NetNs) -> None:
        self.listeners.pop(netns.inode, None)
        self.local_addrs.pop(netns.inode, None)
        self._index_ports()

    def _index_ports(self) -> None:
        """Every port we listen on anywhere: `self_target` runs on every dial, and almost
        every dial goes to a port that is none of ours."""
        self.listen_ports = frozenset(ln.port for mine in self.listeners.values() for ln in mine)

    def _local_to(self, key: int) -> set[str]:
        addrs = set(self.local_addrs.get(key, ()))
        if key == 0:
            node = self.snapshot().node(self.name)
            if node is not None and node.address:
                addrs.add(node.address)
        return addrs

    def self_target(self, ip: str, port: int, netns: NetNs | None) -> bool:
        """Would a connect from `netns` to `ip:port` land on one of our own listeners?

        Loopback (and 0.0.0.0, which connects to loopback) reaches only the listeners of the
        namespace we dial from. Any other address reaches a listener bound to it, wherever
        (pod IPs are routed between namespaces), or a wildcard-bound forwarding listener in
        the namespace that owns that address (a pod's IP in its netns, the node's address in
        ours). Listeners that only answer (metrics, readiness) count through loopback only:
        a pod reaching the node's metrics port is no loop."""
        if port not in self.listen_ports:
            return False  # the common case, decided without parsing the address
        here = netns.inode if netns is not None else 0
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        loop_like = addr.is_loopback or addr.is_unspecified
        if addr.is_unspecified:
            ip = "127.0.0.1" if addr.version == 4 else "::1"
        for key, mine in self.listeners.items():
            if loop_like and key != here:
                continue
            local: set[str] | None = None
            for ln in mine:
                if ln.port != port:
                    continue
                if not ln.forwarding and not loop_like:
                    continue
                if ln.host == ip:
                    return True
                if ln.host in _ANY:
                    if loop_like:
                        return True
                    if local is None:
                        local = self._local_to(key)
                    if ip in local:
                        return True
        return False

    def check_not_self(self, ip: str, port: int, netns: NetNs | None) -> None:
        if self.self_target(ip, port, netns):
            self.metrics.refused("self_loop")
            where = f" in {netns.path}" if netns is not None else ""
            log.warning("refusing to dial %s:%s%s: it is one of ztunnel's own listeners",
                        ip, port, where)  # fmt: skip
            raise DialRefused(
                f"{ip}:{port} is ztunnel's own listener", reason="self_loop", flag="NR",
                status=400,
            )  # fmt: skip

    def hbone_refused(self, reason: str, peer: tuple[str, int] | None) -> None:
        """An HBONE listener refused a connection or stream (mesh.hbone.limits)."""
        self.metrics.refused(reason)
        flag = "DT" if reason == "handshake" else "UO"
        if self.flows is not None and self.flows.size:
            self.flows.record(
                Flow(
                    time=time.time(), verdict="DROPPED", node=self.flows.node,
                    reporter="ztunnel", proxy=self.flows.proxy,
                    src_ip=peer[0] if peer else None, src_port=peer[1] if peer else None,
                    dst_port=self.hbone_port, reason=REASONS[flag], mtls=True,
                    policy=None, duration_ms=0.0,
                )
            )  # fmt: skip
        log_access(
            AccessRecord(
                src=f"{peer[0]}:{peer[1]}" if peer else "-", dst="-", src_identity=None,
                dst_identity=None, service=None, bytes_sent=0, bytes_received=0,
                duration_s=0.0, verdict="error", response_flags=flag, mtls=True,
            )
        )  # fmt: skip


async def splice(down: Endpoint, up: Endpoint, acct: Accounting) -> None:
    """Join two endpoints, wait until both are done, then account for the connection once."""
    acct.connected()
    down.join(up)
    up.join(down)
    try:
        await asyncio.gather(down.done, up.done)
    finally:
        acct.finished(down)


class Redirected:
    """A listener for redirected connections: finds where each was originally going, then
    hands it to the role's `handle`. Outbound (15001) and plaintext inbound (15006) differ
    only in what they do next. `pod_key`/`netns` are set for a listener inside one pod."""

    role = "redirected"

    def __init__(
        self,
        node: Node,
        resolve: Callable[[socket.socket], tuple[str, int]] = original_dst,
        *,
        pod_key: str | None = None,
        netns: NetNs | None = None,
    ) -> None:
        self.node = node
        self.resolve = resolve
        self.pod_key = pod_key
        self.netns = netns

    def protocol(self) -> TcpEndpoint:
        return TcpEndpoint(on_made=lambda ep: self.node.spawn(self._serve(ep)))

    async def _serve(self, ep: TcpEndpoint) -> None:
        t = ep.transport
        if t is None:
            return
        src_ip = (t.get_extra_info("peername") or ("", 0))[0]
        try:
            dst_ip, dst_port = self.resolve(t.get_extra_info("socket"))
        except OSError as exc:
            log.warning("%s from %s: no original destination: %s", self.role, src_ip, exc)
            ep.abort()
            return
        try:
            await self.handle(ep, src_ip, dst_ip, dst_port)
        except asyncio.CancelledError:
            ep.abort()
            raise
        except Exception:
            log.exception("%s %s -> %s:%s failed", self.role, src_ip, dst_ip, dst_port)
            ep.abort()

    async def handle(self, ep: TcpEndpoint, src_ip: str, dst_ip: str, dst_port: int) -> None:
        raise NotImplementedError
