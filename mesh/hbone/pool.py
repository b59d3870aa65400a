"""Dialing and pooling HBONE connections, and serving them.

Connections are pooled per (source identity, destination address): streams of one source
workload to one node share a TLS connection up to a stream cap, so a new flow costs one
HEADERS frame instead of a TCP + TLS handshake. Concurrent first uses of a key wait on the
same dial instead of opening one connection each.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence

from mesh import ktls
from mesh.hbone.connection import Handler, HboneConnection, HboneError, HboneStream

DEFAULT_STREAM_CAP = 100
CONNECT_TIMEOUT = 10.0

PoolKey = tuple[str, tuple[str, int]]  # (source identity, destination ip:port)
# A stdlib context (user-space TLS) or a kTLS one (handshake in user space, records in the
# kernel); a listener may take a kTLS context provider, asked once per accepted connection.
ClientContext = ssl.SSLContext | ktls.KtlsContext
ListenerContext = ssl.SSLContext | ktls.KtlsContext | Callable[[], ktls.KtlsContext]


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
    loop = asyncio.get_running_loop()
    conn = HboneConnection(
        client_side=True, trust_domain=trust_domain, expected_peers=expected_peers, on_idle=on_idle
    )
    try:
        async with asyncio.timeout(connect_timeout):
            if isinstance(ctx, ktls.KtlsContext):
                await ktls.create_connection(lambda: conn, address, ctx)
            else:
                await loop.create_connection(
                    lambda: conn, address[0], address[1], ssl=ctx, server_hostname="hbone.mesh"
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
) -> asyncio.Server | ktls.KtlsServer:
    """An HBONE listener (:15008). `handler` gets every CONNECT and must accept or reject."""
    loop = asyncio.get_running_loop()

    def factory() -> HboneConnection:
        return HboneConnection(client_side=False, trust_domain=trust_domain, handler=handler)

    if not isinstance(ctx, ssl.SSLContext):
        return await ktls.start_server(factory, host, port, ctx)
    return await loop.create_server(factory, host, port, ssl=ctx, reuse_address=True)


class HbonePool:
    """Pooled HBONE connections; `ctx_for(identity)` gives the client context of a source."""

    def __init__(
        self,
        ctx_for: Callable[[str], ClientContext],
        *,
        trust_domain: str,
        stream_cap: int = DEFAULT_STREAM_CAP,
    ) -> None:
        self.ctx_for = ctx_for
        self.trust_domain = trust_domain
        self.stream_cap = stream_cap
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneConnection]] = {}
        self.dials = 0

    def _usable(self, key: PoolKey) -> HboneConnection | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        conns[:] = [c for c in conns if c.usable]
        for c in conns:
            if c.active_streams < self.stream_cap:
                return c
        return None

    async def _get(self, key: PoolKey, expected_peers: frozenset[str] | None) -> HboneConnection:
        while True:
            conn = self._usable(key)
            if conn is not None:
                return conn
            pending = self._dialing.get(key)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            fut: asyncio.Future[HboneConnection] = asyncio.get_running_loop().create_future()
            self._dialing[key] = fut
            try:
                self.dials += 1
                conn = await dial(
                    key[1],
                    self.ctx_for(key[0]),
                    trust_domain=self.trust_domain,
                    expected_peers=expected_peers,
                )
                self._conns.setdefault(key, []).append(conn)
                fut.set_result(conn)
                return conn
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-check and dial themselves
                raise
            finally:
                del self._dialing[key]

    async def connect(
        self,
        source_identity: str,
        address: tuple[str, int],
        authority: str,
        *,
        expected_peers: frozenset[str] | None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> HboneStream:
        """Open a CONNECT stream to `authority` through the node at `address`."""
        key: PoolKey = (source_identity, address)
        conn = await self._get(key, expected_peers)
        if expected_peers is not None and conn.peer_identity not in expected_peers:
            raise HboneError(0, f"pooled peer {conn.peer_identity} is not {sorted(expected_peers)}")
        return await conn.open_stream(authority, headers)

    def connections(self, source_identity: str, address: tuple[str, int]) -> int:
        return len(self._conns.get((source_identity, address), []))

    def close(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.close()
        self._conns.clear()
