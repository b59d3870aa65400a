"""Two ztunnels on loopback, each with its node identity, real TLS, h2 and sockets:
app (node 1) → outbound → HBONE → inbound (node 2) → app. Node 2 lives on 127.0.0.2.

The original destination comes from an injected resolver here (BPF and netfilter answer it in
the e2e tests); everything after that is the production path.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from tests.meshkit import VIP, WEB, echo, sample, two_nodes
from ztunnel.proxy import InboundHbone, InboundPlaintext, Node, Outbound

manifest = two_nodes


@dataclass
class Lab:
    snap: list[Snapshot]
    echo_port: int
    n1: Node
    n2: Node
    outbound_port: int
    plaintext_port: int

    def reconfigure(self, **kw: bool) -> None:
        self.snap[0] = parse_objects(manifest(self.echo_port, **kw))


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    echo_srv = await asyncio.start_server(echo, "127.0.0.3", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    snap = [parse_objects(manifest(echo_port))]
    ids = Identities(ca)
    n2 = Node("n2", lambda: snap[0], ids, MeshMetrics())
    hbone = await serve(
        "127.0.0.2",
        0,
        ids.server_context(n2.identity),
        InboundHbone(n2),
        trust_domain="cluster.local",
    )
    n1 = Node(
        "n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=hbone.sockets[0].getsockname()[1]
    )
    dst: list[tuple[str, int]] = [(VIP, 80)]
    resolve: Callable[[socket.socket], tuple[str, int]] = lambda _s: dst[0]  # noqa: E731
    loop = asyncio.get_running_loop()
    out = await loop.create_server(Outbound(n1, resolve).protocol, "127.0.0.1", 0)
    plain = await loop.create_server(
        InboundPlaintext(n2, lambda _s: ("127.0.0.3", echo_port)).protocol, "127.0.0.2", 0
    )
    yield Lab(
        snap, echo_port, n1, n2,
        out.sockets[0].getsockname()[1], plain.sockets[0].getsockname()[1],
    )  # fmt: skip
    for s in (out, plain, hbone, echo_srv):
        s.close()
    n1.pool.close()
    for t in (*n1.tasks, *n2.tasks):
        t.cancel()


async def talk(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionError:
        data = b""
    writer.close()
    return data


async def test_service_call_crosses_nodes_over_mtls(lab: Lab) -> None:
    payload = b"hello mesh" * 1000
    assert await talk("127.0.0.1", lab.outbound_port, payload) == payload
    for _ in range(50):  # metrics are recorded when the stream finishes
        if sample(lab.n2.metrics, "istio_tcp_connections_closed_total"):
            break
        await asyncio.sleep(0.05)
    assert sample(
        lab.n2.metrics, "istio_tcp_connections_opened_total",
        reporter="destination", source_principal=WEB, connection_security_policy="mutual_tls",
        destination_workload="echo",
    ) == 1  # fmt: skip
    assert sample(lab.n1.metrics, "istio_tcp_connections_opened_total", reporter="source",
                  destination_service="echo.shop.svc.cluster.local") == 1  # fmt: skip
    assert sample(lab.n2.metrics, "istio_tcp_received_bytes_total") == len(payload)


async def test_deny_policy_refuses_with_no_bytes(lab: Lab) -> None:
    lab.reconfigure(deny=True)
    assert await talk("127.0.0.1", lab.outbound_port, b"secret") == b""
    assert sample(lab.n2.metrics, "istio_tcp_connections_opened_total", response_flags="DENY") == 1


async def test_strict_refuses_plaintext_permissive_delivers(lab: Lab) -> None:
    assert await talk("127.0.0.2", lab.plaintext_port, b"plain") == b"plain"
    lab.reconfigure(strict=True)
    assert await talk("127.0.0.2", lab.plaintext_port, b"plain") == b""


async def test_rotation_during_a_live_stream_keeps_it_flowing(tmp_path: Path) -> None:
    """Certificates that live 4 s rotate at 2 s: a stream open across the rotation keeps
    flowing, and a connection opened after it presents the new certificate."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    ids = Identities(ca, ttl=timedelta(seconds=4))
    echo_srv = await asyncio.start_server(echo, "127.0.0.3", 0)
    snap = parse_objects(manifest(echo_srv.sockets[0].getsockname()[1]))
    n2 = Node("n2", lambda: snap, ids, MeshMetrics())
    first_serial = ids.svid(n2.identity).serial
    hbone = await serve(
        "127.0.0.2", 0, ids.listener_context(n2.identity), InboundHbone(n2),
        trust_domain="cluster.local",
    )  # fmt: skip
    hbone_port = hbone.sockets[0].getsockname()[1]
    n1 = Node("n1", lambda: snap, ids, MeshMetrics(), hbone_port=hbone_port)

    async def server_serial() -> int:
        """The serial a new connection to node 2 is shown."""
        _, w = await asyncio.open_connection(
            "127.0.0.2", hbone_port, ssl=ids.client_context(WEB), server_hostname="hbone.mesh"
        )
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        w.close()
        return int(x509.load_der_x509_certificate(der).serial_number)

    assert await server_serial() == first_serial
    out = await asyncio.get_running_loop().create_server(
        Outbound(n1, lambda _s: (VIP, 80)).protocol, "127.0.0.1", 0
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", out.sockets[0].getsockname()[1])
        for i in range(12):  # 3 s of traffic, across the 2 s rotation point
            msg = f"tick {i}".encode()
            writer.write(msg)
            assert await asyncio.wait_for(reader.readexactly(len(msg)), 5) == msg
            await asyncio.sleep(0.25)
        writer.close()
        rotated = await server_serial()
        assert rotated != first_serial
        assert rotated == ids.svid(n2.identity).serial
    finally:
        out.close()
        hbone.close()
        echo_srv.close()
        n1.pool.close()
