"""Upstream connections from the waypoint to backend pods, over HBONE, pooled.

A backend pod is reached through its node's ztunnel (`:authority` = pod ip:port), or the
pod's own :15008 when its node has no address, exactly as ztunnel's outbound would. The
HBONE connection presents the waypoint's identity and each CONNECT carries the original
caller's SPIFFE ID in `x-ambientmesh-source-principal`, which the destination ztunnel believes
only from a waypoint serving that pod, so its L4 policy sees the real caller.

Inside a CONNECT stream runs one HTTP connection: HTTP/1.1 (one request at a time, kept
alive in an idle list) or HTTP/2 (shared by many requests). Both are pooled per (caller,
pod ip:port): a connection opened for one caller must never carry another's requests,
because the destination attributes the whole stream to the principal named when it opened.
The HBONE TLS connections underneath are pooled by `HbonePool` as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from mesh.config.snapshot import Snapshot
from mesh.hbone import SOURCE_PRINCIPAL_HEADER, HbonePool
from mesh.hbone.nexthop import next_hop
from mesh.hbone.pool import CONNECT_TIMEOUT
from mesh.ports import HBONE_PORT
from mesh.stream import Endpoint
from waypoint.h1 import H1Client
from waypoint.h2 import H2Client
from waypoint.service import Target
from waypoint.wire import ClientExchange, RequestHead

log = logging.getLogger("waypoint.upstream")

# Idle HTTP/1.1 connections kept per (caller, pod): as many as requests that can be in flight
# at once on one downstream HTTP/2 connection (and then some). A cap below that (it was 64)
# made an HTTP/2 client with 128 streams in flight close and re-open upstream connections on
# every request past the cap (a CONNECT, a dial at the destination, an accept at the app),
# which cost CPU exactly when the waypoint was busiest: a small overload became a collapse.
MAX_IDLE_PER_KEY = 1024
IDLE_TIMEOUT = 60.0  # an unused upstream connection (and its CONNECT stream) is closed

C = TypeVar("C", H1Client, H2Client)
Key = tuple[str, str, int]  # (caller principal, pod ip, pod port)


class Upstreams:
    def __init__(
        self,
        pool: HbonePool,
        identity: str,
        snapshot: Callable[[], Snapshot],
        *,
        hbone_port: int = HBONE_PORT,
        node_ports: Mapping[str, int] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.pool = pool
        self.identity = identity
        self.snapshot = snapshot
        self.hbone_port = hbone_port
        self.node_ports = dict(node_ports or {})
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        # When each idle HTTP/1.1 connection was parked (loop time): one sweep timer expires
        # them, instead of a timer armed and cancelled around every request.
        self._idle_since: dict[H1Client, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._h1: dict[Key, list[H1Client]] = {}
        self._h2: dict[Key, list[H2Client]] = {}
        self.dials = 0

    def hbone_address(self, t: Target) -> tuple[tuple[str, int], str]:
        """Where to send the CONNECT for `t`, and which identity must answer there."""
        snap = self.snapshot()
        pod = t.pod or snap.pod_by_ip(t.ip)
        hop = next_hop(
            snap, pod, t.ip, node=t.node, hbone_port=self.hbone_port, node_ports=self.node_ports
        )
        if hop is None:
            raise OSError(f"{t.ip}:{t.port} is not a known workload")
        return hop

    async def _tunnel(self, t: Target, caller: str, src_ip: str) -> Endpoint:
        addr, peer = self.hbone_address(t)
        self.dials += 1
        headers = [(SOURCE_PRINCIPAL_HEADER, caller)]
        if src_ip:
            headers.append(("forwarded", f"for={src_ip}"))
        return await self.pool.connect(
            self.identity,
            addr,
            f"{t.ip}:{t.port}",
            expected_peers=frozenset({peer}),
            headers=headers,
        )

    async def open(
        self,
        t: Target,
        head: RequestHead,
        protocol: str,
        caller: str,
        src_ip: str,
        *,
        fresh: bool = False,
    ) -> tuple[ClientExchange, bool]:
        """Send `head` to `t`; returns the exchange and whether it rides a reused connection
        (the caller retries once on a fresh one if a reused one turns out to be dead)."""
        key: Key = (caller, t.ip, t.port)
        if protocol == "h2":
            shared = self._h2.get(key)
            if shared and not fresh:
                for h2c in shared:
                    if h2c.has_room:
                        return h2c.open(head), True
            h2c = H2Client(on_gone=lambda c: self._drop(self._h2, key, c))
            tunnel = await self._tunnel(t, caller, src_ip)
            # Our preface first: the server's SETTINGS may already be waiting in the tunnel,
            # and answering them before the preface would corrupt the connection.
            h2c.join(tunnel)
            h2c.start()
            tunnel.join(h2c)
            self._h2.setdefault(key, []).append(h2c)
            return h2c.open(head), False
        idle = self._h1.get(key)
        while idle and not fresh:
            old = idle.pop()
            self._idle_since.pop(old, None)
            if old.reusable:
                return old.start(head), True
        h1c = H1Client(on_free=lambda c: self._free(key, c), on_gone=self._gone_h1(key))
        tunnel = await self._tunnel(t, caller, src_ip)
        h1c.join(tunnel)
        ex = h1c.start(head)  # before any byte from the backend can arrive
        tunnel.join(h1c)
        return ex, False

    def _free(self, key: Key, c: H1Client) -> None:
        idle = self._h1.setdefault(key, [])
        if len(idle) < MAX_IDLE_PER_KEY:
            idle.append(c)
            loop = asyncio.get_running_loop()
            self._idle_since[c] = loop.time()
            if self._sweep is None:
                self._sweep = loop.call_later(self.idle_timeout, self._expire_idle)
        else:
            c.close_wire()

    def _expire_idle(self) -> None:
        """Close what was unused for idle_timeout (the destination's ztunnel frees its socket
        too); come back when the next one is due, while any are parked."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout
        oldest: float | None = None
        for key, conns in list(self._h1.items()):
            for c in list(conns):
                since = self._idle_since.get(c)
                if since is None:
                    continue
                if since <= cutoff:
                    self._idle_since.pop(c, None)
                    self._drop(self._h1, key, c)
                    c.dead = True
                    c.close_wire()
                elif oldest is None or since < oldest:
                    oldest = since
        if oldest is not None:
            delay = max(oldest + self.idle_timeout - loop.time(), 0.05)
            self._sweep = loop.call_later(delay, self._expire_idle)

    def _gone_h1(self, key: Key) -> Callable[[H1Client], None]:
        def gone(c: H1Client) -> None:
            self._idle_since.pop(c, None)
            self._drop(self._h1, key, c)

        return gone

    @staticmethod
    def _drop(
        table: dict[Key, list[H1Client]] | dict[Key, list[H2Client]], key: Key, c: object
    ) -> None:
        conns = table.get(key)
        if conns is not None and c in conns:
            conns.remove(c)  # type: ignore[arg-type]
            if not conns:
                del table[key]

    def idle_h1(self) -> int:
        return sum(len(v) for v in self._h1.values())

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle_since.clear()
        for conns in list(self._h1.values()):
            for c in conns:
                c.close_wire()
        for conns2 in list(self._h2.values()):
            for c2 in conns2:
                c2.close_wire()
        self._h1.clear()
        self._h2.clear()
