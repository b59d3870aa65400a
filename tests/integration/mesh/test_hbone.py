"""HBONE end to end on loopback with real TLS, real h2 and real sockets:

app → outbound listener → pooled HBONE (mTLS, HTTP/2 CONNECT) → HBONE server → echo app.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from mesh.hbone import ConnectRequest, HboneError, HbonePool, serve
from mesh.identity.spiffe import node_id
from mesh.tcp import TcpEndpoint, join
from mesh.tls import client_context, server_context

TD = "cluster.local"
CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"
NODE = node_id(TD, "node-2")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.write_eof()  # half-close answered with half-close
    await writer.drain()
    writer.close()


@dataclass
class Mesh:
    ca: CertificateAuthority
    hbone_port: int
    echo_port: int
    pool: HbonePool
    seen: list[tuple[str, str]] = field(default_factory=list)  # (peer identity, authority)
    denied: set[str] = field(default_factory=set)

    async def outbound(self, authority: str, expected: frozenset[str] | None = None) -> int:
        """A listener standing in for ztunnel's :15001: each connection becomes a stream."""

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raise AssertionError("unused")

        loop = asyncio.get_running_loop()

        def factory() -> TcpEndpoint:
            ep = TcpEndpoint()

            async def tunnel() -> None:
                try:
                    stream = await self.pool.connect(
                        CLIENT, ("127.0.0.1", self.hbone_port), authority,
                        expected_peers=expected if expected is not None else frozenset({NODE}),
                    )  # fmt: skip
                except HboneError:
                    ep.abort()
                    return
                join(ep, stream)

            self._tasks.add(loop.create_task(tunnel()))
            return ep

        server = await loop.create_server(factory, "127.0.0.1", 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _servers: list[asyncio.Server] = field(default_factory=list)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    m: Mesh

    async def handler(req: ConnectRequest) -> None:
        m.seen.append((req.peer_identity, req.authority))
        if req.peer_identity in m.denied:
            req.reject(403, "denied by policy")
            return
        host, _, port = req.authority.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _, ep = await loop.create_connection(TcpEndpoint, host, int(port))
        except OSError:
            req.reject(503, "target refused")
            return
        join(req.accept(), ep)

    hbone = await serve(
        "127.0.0.1", 0, server_context(ca.issue(NODE), ca.bundle_pem), handler, trust_domain=TD
    )
    client_ctx = client_context(ca.issue(CLIENT), ca.bundle_pem)
    pool = HbonePool(lambda _: client_ctx, trust_domain=TD)
    m = Mesh(ca, hbone.sockets[0].getsockname()[1], echo_srv.sockets[0].getsockname()[1], pool)
    yield m
    pool.close()
    for s in m._servers:
        s.close()
    hbone.close()
    echo_srv.close()
    for t in m._tasks:
        t.cancel()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 16):
            writer.write(payload[i : i + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    data = await reader.read(-1)  # EOF only after the echo half-closed back through the tunnel
    await sender
    writer.close()
    return data


async def test_bytes_and_identity_cross_the_tunnel(mesh: Mesh) -> None:
    port = await mesh.outbound(f"127.0.0.1:{mesh.echo_port}")
    payload = os.urandom(8 << 20)
    back = await asyncio.wait_for(roundtrip(port, payload), 60)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    assert mesh.seen == [(CLIENT, f"127.0.0.1:{mesh.echo_port}")]


async def test_denied_connect_closes_client_without_bytes(mesh: Mesh) -> None:
    mesh.denied.add(CLIENT)
    port = await mesh.outbound(f"127.0.0.1:{mesh.echo_port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionError:  # reset instead of FIN: also closed, also no bytes
        data = b""
    assert data == b""
    writer.close()
    with pytest.raises(HboneError) as err:
        await mesh.pool.connect(
            CLIENT, ("127.0.0.1", mesh.hbone_port), f"127.0.0.1:{mesh.echo_port}",
            expected_peers=frozenset({NODE}),
        )  # fmt: skip
    assert err.value.status == 403


async def test_unreachable_target_is_503(mesh: Mesh) -> None:
    s = await asyncio.start_server(echo, "127.0.0.1", 0)
    dead = s.sockets[0].getsockname()[1]
    s.close()
    await s.wait_closed()
    with pytest.raises(HboneError) as err:
        await mesh.pool.connect(
            CLIENT, ("127.0.0.1", mesh.hbone_port), f"127.0.0.1:{dead}",
            expected_peers=frozenset({NODE}),
        )  # fmt: skip
    assert err.value.status == 503


async def test_server_with_another_identity_is_refused(mesh: Mesh) -> None:
    with pytest.raises(HboneError, match="not the expected"):
        await mesh.pool.connect(
            CLIENT, ("127.0.0.1", mesh.hbone_port), f"127.0.0.1:{mesh.echo_port}",
            expected_peers=frozenset({node_id(TD, "node-3")}),
        )  # fmt: skip


async def test_hundred_concurrent_streams_share_one_connection(mesh: Mesh) -> None:
    port = await mesh.outbound(f"127.0.0.1:{mesh.echo_port}")
    payloads = [os.urandom(20_000 + i) for i in range(100)]
    results = await asyncio.wait_for(asyncio.gather(*(roundtrip(port, p) for p in payloads)), 60)
    assert results == payloads
    assert mesh.pool.dials == 1
    assert mesh.pool.connections(CLIENT, ("127.0.0.1", mesh.hbone_port)) == 1
