"""What the node proxy's roles share: the node, its config, identities, pool and telemetry.

Also the two pieces of plumbing every role needs: where a redirected connection was going
(`original_dst`), and one connection's telemetry from open to close (`Accounting`: one
metric update and one access-log line per connection, never per chunk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from certs.spiffe import node_id
from mesh.accesslog import AccessRecord, log_access
from mesh.config.snapshot import Snapshot
from mesh.hbone.pool import CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_STREAM_CAP, HbonePool
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.netns import NetNs, connect_in
from mesh.stream import Endpoint
from mesh.tcp import TcpEndpoint
from ztunnel.identity import Identities

log = logging.getLogger("ztunnel")

SO_ORIGINAL_DST = 80
HBONE_PORT = 15008


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination an app connected to before redirect (BPF getsockopt or netfilter)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def _no_netns(_pod_key: str) -> NetNs | None:
    return None


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
    pool: HbonePool = field(init=False)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.pool = HbonePool(
            self.identities.client_context_async,
            trust_domain=self.trust_domain,
            stream_cap=self.stream_cap,
            idle_timeout=self.idle_timeout,
            connect_timeout=self.connect_timeout,
        )

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
        """A plain TCP connection, from inside `netns` when given (an enrolled pod's)."""
        proto = await connect_in(netns, TcpEndpoint, ip, port, connect_timeout=self.connect_timeout)
        assert isinstance(proto, TcpEndpoint)
        return proto


def forwarded_for(value: str) -> str | None:
    """The first `for=` address of an RFC 7239 `Forwarded` header (quotes, brackets and a
    port stripped), or None."""
    for element in value.split(","):
        for pair in element.split(";"):
            k, _, v = pair.strip().partition("=")
            if k.lower() == "for" and v:
                v = v.strip('"')
                if v.startswith("["):
                    return v[1 : v.find("]")] or None
                host, sep, port = v.rpartition(":")
                return host if sep and port.isdigit() else v
    return None


class Accounting:
    """One connection's telemetry: `opened` once, then `refused` or `finished` once."""

    __slots__ = ("done", "labels", "metrics", "record", "started")

    def __init__(
        self,
        metrics: MeshMetrics,
        labels: ConnectionLabels,
        *,
        reporter: str,
        src: str,
        dst: str,
        src_identity: str | None,
        dst_identity: str | None,
        service: str | None,
        mtls: bool,
        policy: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started = time.monotonic()
        self.done = False
        self.record: dict[str, object] = {
            "reporter": reporter,
            "src": src,
            "dst": dst,
            "src_identity": src_identity,
            "dst_identity": dst_identity,
            "service": service,
            "mtls": mtls,
            "policy": policy,
        }
        metrics.tcp_opened(labels)

    def refused(self, verdict: str, flags: str, **extra: object) -> None:
        """Closed before any byte moved (denied, or the destination failed)."""
        if self.done:
            return
        self.done = True
        labels = self.labels
        if labels.response_flags != flags:
            # Istio labels the closed counter with the flag the connection ended with.
            labels = dataclasses.replace(labels, response_flags=flags)
        self.metrics.tcp_closed(labels, 0, 0)
        record = {**self.record, **extra}
        log_access(
            AccessRecord(
                **record,  # type: ignore[arg-type]
                bytes_sent=0,
                bytes_received=0,
                duration_s=time.monotonic() - self.started,
                verdict=verdict,
                response_flags=flags,
            )
        )

    def finished(self, downstream: Endpoint) -> None:
        """Spliced and now closed: bytes as seen from the downstream (caller's) side."""
        if self.done:
            return
        self.done = True
        sent, received = downstream.bytes_received, downstream.bytes_sent
        self.metrics.tcp_closed(self.labels, sent, received)
        log_access(
            AccessRecord(
                **self.record,  # type: ignore[arg-type]
                bytes_sent=sent,
                bytes_received=received,
                duration_s=time.monotonic() - self.started,
                verdict="allow",
            )
        )


async def splice(down: Endpoint, up: Endpoint, acct: Accounting) -> None:
    """Join two endpoints, wait until both are done, then account for the connection once."""
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
