"""Dialing and pooling HBONE connections, and serving them.

Connections are pooled per (source identity, destination address): streams of one source
workload to one node share a TLS connection up to a stream cap, so a new flow costs one
HEADERS frame instead of a TCP + TLS handshake. Concurrent first uses of a key wait on the
same dial instead of opening one connection each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

from mesh import ktls
from mesh.hbone.connection import Handler, HboneConnection, HboneError, HboneStream
from mesh.hbone.limits import ConnectionGate, HboneLimits, RefusedHook
from mesh.tls import open_tls_connection, start_tls_server

DEFAULT_STREAM_CAP = 100
DEFAULT_IDLE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
REFUSED_RETRIES = 2  # a CONNECT refused unprocessed (REFUSED_STREAM) is tried again this often

PoolKey = tuple[str, tuple[str, int]]  # (source identity, destination ip:port)
# A stdlib context (user-space TLS) or a kTLS one (handshake in user space, records in the
# kernel); a listener may take a kTLS context provider, asked once per accepted connection.
ClientContext = ssl.SSLContext | ktls.KtlsContext
ListenerContext = ssl.SSLContext | ktls.KtlsContext | Callable[[], ktls.KtlsContext]
Listener = asyncio.Server | ktls.KtlsServer
# Gives the client context of a source identity, maybe after signing its certificate.
ContextFor = Callable[[str], ClientContext | Awaitable[ClientContext]]


async def dial(
    address: tuple[str, int],
    ctx: ClientContext,
    *,
    trust_domain: str,
    expected_peers: frozenset[str] | None,
    on_idle: Callable[[HboneConnection], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> HboneConnection:
    """A new HBONE connection whose peer has passed the SPIFFE checks."""
    conn = HboneConnection(
        client_side=True, trust_domain=trust_domain, expected_peers=expected_peers, on_idle=on_idle
    )
    try:
        async with asyncio.timeout(connect_timeout):
            if isinstance(ctx, ktls.KtlsContext):
                await ktls.create_connection(lambda: conn, address, ctx)
            else:
                await open_tls_connection(
                    lambda: conn, address[0], address[1], ctx, server_hostname="hbone.mesh"
                )
            await conn.ready
    except (OSError, ssl.SSLError, TimeoutError, ktls.KtlsError) as exc:
        conn.close()
        raise HboneError(0, f"HBONE {address[0]}:{address[1]}: {exc}") from exc
    return conn


async def serve(
    host: str,
    port: int,
    ctx: ListenerContext,
    handler: Handler,
    *,
    trust_domain: str,
    sock: socket.socket | None = None,
    limits: HboneLimits | None = None,
    gate: ConnectionGate | None = None,
    on_refused: RefusedHook | None = None,
) -> Listener:
    """An HBONE listener (:15008). `handler` gets every CONNECT and must accept or reject.
    With `sock` (a listening socket made elsewhere, e.g. inside a pod's netns), `host` and
    `port` are ignored. `limits` bound what a peer may cost (mesh.hbone.limits); `gate`
    counts connections across all of a node's listeners; `on_refused` hears every refusal."""
    lim = limits or HboneLimits()

    def factory() -> HboneConnection:
        return HboneConnection(
            client_side=False, trust_domain=trust_domain, handler=handler,
            limits=lim, gate=gate, on_refused=on_refused,
        )  # fmt: skip

    hs = lim.handshake_timeout
    if not isinstance(ctx, ssl.SSLContext):
        if sock is not None:
            return ktls.KtlsServer(sock, ctx, factory, timeout=hs)
        return await ktls.start_server(factory, host, port, ctx, handshake_timeout=hs)
    if sock is not None:
        return await start_tls_server(factory, ctx, sock=sock, handshake_timeout=hs)
    return await start_tls_server(
        factory, ctx, host=host, port=port, reuse_address=True, handshake_timeout=hs
    )


class HbonePool:
    """Pooled HBONE connections keyed by (source identity, destination HBONE address).

    `ctx_for(identity)` gives the client context of a source identity; it may be a coroutine
    function (a certificate manager signing on first use). A connection takes new streams up
    to `stream_cap` (and the peer's MAX_CONCURRENT_STREAMS); past that a second one opens.
    One that has carried no stream for `idle_timeout` seconds is closed; one that failed or
    was closed by the peer leaves the pool at once, so the next stream dials afresh."""

    def __init__(
        self,
        ctx_for: ContextFor,
        *,
        trust_domain: str,
        stream_cap: int = DEFAULT_STREAM_CAP,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.ctx_for = ctx_for
        self.trust_domain = trust_domain
        self.stream_cap = stream_cap
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self._idle: dict[HboneConnection, asyncio.TimerHandle] = {}
        self.dials = 0

    def _has_room(self, c: HboneConnection) -> bool:
        cap = min(self.stream_cap, c.h2.remote_settings.max_concurrent_streams)
        return c.usable and c.active_streams < cap

    def _usable(self, key: PoolKey) -> HboneConnection | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        for c in conns:
            if self._has_room(c):
                return c
        return None

    async def _context(self, identity: str) -> ClientContext:
        ctx = self.ctx_for(identity)
        if inspect.isawaitable(ctx):
            return await ctx
        return ctx

    async def _get(self, key: PoolKey, expected_peers: frozenset[str] | None) -> HboneConnection:
        while True:
            conn = self._usable(key)
            if conn is not None:
                return conn
            pending = self._dialing.get(key)
            if pending is not None:
                # Another caller is dialing this key: wait for it instead of opening a second
                # connection, then re-check (it may already be full, or have failed).
                with contextlib.suppress(HboneError):
                    await asyncio.shield(pending)
                continue
            fut: asyncio.Future[HboneConnection] = asyncio.get_running_loop().create_future()
            self._dialing[key] = fut
            try:
                self.dials += 1
                conn = await dial(
                    key[1],
                    await self._context(key[0]),
                    trust_domain=self.trust_domain,
                    expected_peers=expected_peers,
                    on_idle=self._on_idle,
                    connect_timeout=self.connect_timeout,
                )
                self._conns.setdefault(key, []).append(conn)
                conn.closed.add_done_callback(functools.partial(self._evicted, key, conn))
                fut.set_result(conn)
                return conn
            except BaseException as exc:
                fut.set_exception(
                    exc if isinstance(exc, HboneError) else HboneError(0, f"dial failed: {exc}")
                )
                fut.exception()  # retrieved: waiters re-check and dial themselves
                raise
            finally:
                del self._dialing[key]

    def _evicted(self, key: PoolKey, conn: HboneConnection, _f: object) -> None:
        self._evict(key, conn)

    def _evict(self, key: PoolKey, conn: HboneConnection) -> None:
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]
        timer = self._idle.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _on_idle(self, conn: HboneConnection) -> None:
        old = self._idle.pop(conn, None)
        if old is not None:
            old.cancel()
        self._idle[conn] = asyncio.get_running_loop().call_later(
            self.idle_timeout, self._expire, conn
        )

    def _expire(self, conn: HboneConnection) -> None:
        self._idle.pop(conn, None)
        if conn.active_streams == 0:
            conn.close()  # `closed` fires and evicts it

    async def connect(
        self,
        source_identity: str,
        address: tuple[str, int],
        authority: str,
        *,
        expected_peers: frozenset[str] | None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> HboneStream:
        """Open a CONNECT stream to `authority` through the HBONE peer at `address`."""
        key: PoolKey = (source_identity, address)
        for attempt in range(REFUSED_RETRIES + 1):
            conn = await self._get(key, expected_peers)
            if expected_peers is not None and conn.peer_identity not in expected_peers:
                # The pool is keyed by address; a different identity expected at the same
                # address (a pod moved, a node re-keyed) must never ride an old connection.
                raise HboneError(
                    0, f"pooled peer {conn.peer_identity} is not {sorted(expected_peers)}"
                )
            timer = self._idle.pop(conn, None)
            if timer is not None:
                timer.cancel()
            try:
                return await conn.open_stream(
                    authority, headers, response_timeout=self.connect_timeout
                )
            except HboneError as exc:
                # Over the server's stream limit (we sent before its SETTINGS said so): that
                # connection is full now (h2 knows the limit), so the next try goes elsewhere.
                if not exc.refused or attempt == REFUSED_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def connections(self, source_identity: str, address: tuple[str, int]) -> int:
        return len(self._conns.get((source_identity, address), []))

    def stats(self) -> list[dict[str, object]]:
        """For the admin dump: what is pooled, to whom, how busy."""
        return [
            {
                "source": k[0],
                "address": f"{k[1][0]}:{k[1][1]}",
                "peer": c.peer_identity,
                "active_streams": c.active_streams,
                "streams_opened": c.streams_opened,
            }
            for k, conns in self._conns.items()
            for c in conns
        ]

    def close(self) -> None:
        for timer in self._idle.values():
            timer.cancel()
        self._idle.clear()
        for conns in list(self._conns.values()):
            for c in list(conns):
                c.close()
        self._conns.clear()
