"""The HBONE pool's lifecycle on real connections: one connection per (source identity, peer)
up to the stream cap, a second past it, idle connections closed after the idle timeout and
dialled afresh on the next use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh.hbone import ConnectRequest, HbonePool, HboneStream, serve
from mesh.identity.spiffe import node_id
from mesh.tls import client_context, server_context

TD = "cluster.local"
WEB = "spiffe://cluster.local/ns/shop/sa/web"
BATCH = "spiffe://cluster.local/ns/shop/sa/batch"
NODE = node_id(TD, "node-2")


@dataclass
class Peer:
    address: tuple[str, int]
    accepted: list[str]
    ca: CertificateAuthority


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    accepted: list[str] = []

    async def handler(req: ConnectRequest) -> None:
        accepted.append(req.peer_identity)
        req.accept()  # the stream stays open until the client ends it

    srv = await serve(
        "127.0.0.1", 0, server_context(ca.issue(NODE), ca.bundle_pem), handler, trust_domain=TD
    )
    yield Peer(("127.0.0.1", int(srv.sockets[0].getsockname()[1])), accepted, ca)
    srv.close()


def pool_for(peer: Peer, **kw: float) -> HbonePool:
    ctxs = {i: client_context(peer.ca.issue(i), peer.ca.bundle_pem) for i in (WEB, BATCH)}
    return HbonePool(ctxs.__getitem__, trust_domain=TD, **kw)  # type: ignore[arg-type]


async def open_streams(pool: HbonePool, peer: Peer, identity: str, n: int) -> list[HboneStream]:
    return list(
        await asyncio.gather(
            *(
                pool.connect(identity, peer.address, "10.0.0.1:80", expected_peers=None)
                for _ in range(n)
            )
        )
    )


async def wait_for(cond: Callable[[], bool]) -> None:
    for _ in range(250):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_stream_cap_opens_a_second_connection(peer: Peer) -> None:
    pool = pool_for(peer, stream_cap=2)
    try:
        streams = await open_streams(pool, peer, WEB, 3)
        assert pool.connections(WEB, peer.address) == 2
        assert pool.dials == 2
        assert len(peer.accepted) == 3
        # a freed slot is reused before any new dial
        streams[0].abort()
        await wait_for(lambda: any(s["active_streams"] == 1 for s in pool.stats()))
        streams.append(await pool.connect(WEB, peer.address, "10.0.0.1:80", expected_peers=None))
        assert pool.dials == 2
    finally:
        pool.close()


async def test_streams_the_server_refuses_over_its_limit_are_retried_elsewhere(
    peer: Peer,
) -> None:
    """A pool whose cap (150) is above the server's limit (100): every CONNECT opens, over two
    connections. Streams sent before the server's SETTINGS arrived are refused unprocessed
    (REFUSED_STREAM) and retried on another connection; streams after it see the limit in h2.
    Which of the two happens depends on timing, so this checks the outcome, not the path."""
    pool = pool_for(peer, stream_cap=150)
    try:
        streams = await open_streams(pool, peer, WEB, 150)
        assert len(streams) == 150 and len(peer.accepted) == 150
        assert pool.connections(WEB, peer.address) == 2
    finally:
        pool.close()


async def test_identities_never_share_a_connection(peer: Peer) -> None:
    pool = pool_for(peer)
    try:
        await open_streams(pool, peer, WEB, 2)
        await open_streams(pool, peer, BATCH, 1)
        assert pool.connections(WEB, peer.address) == 1
        assert pool.connections(BATCH, peer.address) == 1
        assert sorted(peer.accepted) == sorted([WEB, WEB, BATCH])  # each seen as itself
    finally:
        pool.close()


async def test_idle_connection_expires_and_next_use_dials_again(peer: Peer) -> None:
    pool = pool_for(peer, idle_timeout=0.3)
    try:
        streams = await open_streams(pool, peer, WEB, 2)
        await asyncio.sleep(0.5)  # busy connections never expire
        assert pool.connections(WEB, peer.address) == 1
        for s in streams:
            s.abort()
        await wait_for(lambda: pool.connections(WEB, peer.address) == 0)
        await open_streams(pool, peer, WEB, 1)
        assert pool.dials == 2
    finally:
        pool.close()
