"""ztunnel's certificate manager against the real CA service over mTLS: one signing however
many connections ask at once, rotation at half life, and a CA outage that keeps the current
certificate serving and recovers by itself."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from certs.ca import CertificateAuthority
from certs.service import CaService, SnapshotAuthorizer
from mesh.config.parse import parse_objects
from mesh.identity.caclient import CaClient
from mesh.identity.manager import Identities
from mesh.identity.spiffe import node_id
from mesh.identity.svid import Svid
from mesh.tls import server_context

WEB = "spiffe://cluster.local/ns/shop/sa/web"


class Counting:
    """The real client, counting the signing requests that reach the CA."""

    def __init__(self, inner: CaClient) -> None:
        self.inner = inner
        self.calls = 0

    async def sign(self, identity: str, ttl: timedelta) -> Svid:
        self.calls += 1
        return await self.inner.sign(identity, ttl)

    @property
    def bundle_pem(self) -> bytes:
        return self.inner.bundle_pem


@dataclass
class Ca:
    ca: CertificateAuthority
    service: CaService
    server: asyncio.Server
    port: int

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def start(self) -> None:
        self.server = await self.service.start("127.0.0.1", self.port)


@pytest.fixture
async def ca(tmp_path: Path) -> AsyncIterator[Ca]:
    authority = CertificateAuthority.init(tmp_path / "ca")
    snap = parse_objects(
        [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
          "spec": {"nodeName": "n1", "serviceAccountName": "web"},
          "status": {"podIP": "10.0.1.2"}}]
    )  # fmt: skip
    service = CaService(authority, SnapshotAuthorizer(lambda: snap))
    server = await service.start("127.0.0.1", 0)
    c = Ca(authority, service, server, int(server.sockets[0].getsockname()[1]))
    yield c
    c.server.close()


def identities(c: Ca, ttl: timedelta) -> tuple[Identities, Counting]:
    node = c.ca.issue(node_id("cluster.local", "n1"))
    signer = Counting(CaClient(("127.0.0.1", c.port), node, c.ca.bundle_pem))
    return Identities(signer, ttl, bundle_pem=c.ca.bundle_pem), signer


async def test_concurrent_first_use_signs_once(ca: Ca) -> None:
    ids, signer = identities(ca, timedelta(hours=1))
    got = await asyncio.gather(*(ids.ensure(WEB) for _ in range(20)))
    assert signer.calls == 1
    assert len({s.serial for s in got}) == 1
    ca.ca.verify_leaf(got[0].leaf)
    assert ids.client_context(WEB) is ids.client_context(WEB)  # cached, not rebuilt


async def test_rotates_at_half_life(ca: Ca) -> None:
    ids, signer = identities(ca, timedelta(seconds=3))
    first = await ids.ensure(WEB)
    rotation = asyncio.create_task(ids.run(min_sleep=0.05))
    try:
        for _ in range(60):
            if ids.svid(WEB).serial != first.serial:
                break
            await asyncio.sleep(0.05)
        rotated = ids.svid(WEB)
        assert rotated.serial != first.serial
        assert rotated.not_after > first.not_after
        assert signer.calls == 2
    finally:
        rotation.cancel()


async def test_ca_outage_keeps_the_current_certificate_and_recovers(
    ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    ids, signer = identities(ca, timedelta(seconds=4))
    first = await ids.ensure(WEB)
    await ca.stop()
    rotation = asyncio.create_task(ids.run(min_sleep=0.05, retry=0.2, max_retry=0.4))
    try:
        with caplog.at_level(logging.WARNING, "ztunnel"):
            await asyncio.sleep(3.0)  # past half life: renewals fail, the SVID is still valid
        assert ids.svid(WEB).serial == first.serial
        # it kept trying, backing off (0.2, 0.4, 0.4 s...), never in a tight loop
        assert 3 <= signer.calls <= 8
        assert any("keeping the current one" in r.message for r in caplog.records)
        ids.client_context(WEB)  # still usable for new connections
        await ca.start()
        for _ in range(40):
            if ids.svid(WEB).serial != first.serial:
                break
            await asyncio.sleep(0.05)
        assert ids.svid(WEB).serial != first.serial  # recovered without anyone's help
    finally:
        rotation.cancel()


async def handshake_ok(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    try:
        _, w = await asyncio.open_connection(
            "127.0.0.1", srv.sockets[0].getsockname()[1], ssl=client_ctx, server_hostname="x"
        )
        w.close()
        return True
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        srv.close()


async def test_trust_bundle_from_the_ca_is_adopted(ca: Ca, tmp_path: Path) -> None:
    """Root rotation: the CA starts handing out a bundle with a second root; after the next
    signing, this node trusts peers whose certificates chain to the new root."""
    ids, _ = identities(ca, timedelta(hours=1))
    await ids.ensure(WEB)
    new_root = CertificateAuthority.init(tmp_path / "new-root")
    peer = new_root.issue(node_id("cluster.local", "n2"))
    peer_ctx = server_context(peer, ca.ca.bundle_pem + new_root.bundle_pem)
    assert not await handshake_ok(peer_ctx, cast(ssl.SSLContext, ids.client_context(WEB)))

    ca.ca.bundle_pem += new_root.bundle_pem  # the operator adds the next root
    await ids.ensure(node_id("cluster.local", "n1"))  # any signing carries the bundle back
    assert new_root.bundle_pem in ids.bundle_pem
    assert await handshake_ok(peer_ctx, cast(ssl.SSLContext, ids.client_context(WEB)))
