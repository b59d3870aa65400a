"""The CA service over mTLS: a node gets SVIDs for its own pods only; everything else is
refused and logged, and bad requests never take the service down."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority
from certs.service import CaService, SnapshotAuthorizer
from mesh.config.parse import parse_objects
from mesh.identity.caclient import CaClient, CaError
from mesh.identity.spiffe import node_id
from mesh.tls import client_context

WEB = "spiffe://cluster.local/ns/shop/sa/web"  # a pod on n1
DB = "spiffe://cluster.local/ns/shop/sa/db"  # a pod on n2


def pods() -> list[dict[str, object]]:
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
         "spec": {"nodeName": node, "serviceAccountName": sa}, "status": {"podIP": ip}}
        for name, node, sa, ip in (("web", "n1", "web", "10.0.1.2"), ("db", "n2", "db", "10.0.2.2"))
    ]  # fmt: skip


@pytest.fixture
async def ca_service(tmp_path: Path) -> AsyncIterator[tuple[CertificateAuthority, int]]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    snap = parse_objects(pods())
    server = await CaService(ca, SnapshotAuthorizer(lambda: snap)).start("127.0.0.1", 0)
    yield ca, server.sockets[0].getsockname()[1]
    server.close()


async def test_node_gets_its_own_pods_identity(
    ca_service: tuple[CertificateAuthority, int],
) -> None:
    ca, port = ca_service
    client = CaClient(("127.0.0.1", port), ca.issue(node_id("cluster.local", "n1")), ca.bundle_pem)
    svid = await client.sign(WEB)
    assert svid.identity == WEB
    ca.verify_leaf(svid.leaf)


async def test_node_is_refused_another_nodes_pod_and_it_is_logged(
    ca_service: tuple[CertificateAuthority, int], caplog: pytest.LogCaptureFixture
) -> None:
    ca, port = ca_service
    client = CaClient(("127.0.0.1", port), ca.issue(node_id("cluster.local", "n1")), ca.bundle_pem)
    with caplog.at_level(logging.WARNING, "certs.service"), pytest.raises(CaError) as err:
        await client.sign(DB)
    assert err.value.status == 403
    assert any("n1" in r.message and DB in r.message for r in caplog.records)


async def test_workload_certificate_cannot_request_svids(
    ca_service: tuple[CertificateAuthority, int],
) -> None:
    ca, port = ca_service
    client = CaClient(("127.0.0.1", port), ca.issue(WEB), ca.bundle_pem)
    with pytest.raises(CaError, match="not a node identity"):
        await client.sign(WEB)


async def test_garbage_gets_400_and_service_keeps_serving(
    ca_service: tuple[CertificateAuthority, int],
) -> None:
    ca, port = ca_service
    ctx: ssl.SSLContext = client_context(ca.issue(node_id("cluster.local", "n1")), ca.bundle_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    for junk in (b"POST /v1/sign HTTP/1.1\r\ncontent-length: 5\r\n\r\n{{{{{", b"\x00\xff\r\n\r\n"):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="ca")
        w.write(junk)
        assert (await r.read(-1)).startswith(b"HTTP/1.1 400")
        w.close()
    client = CaClient(("127.0.0.1", port), ca.issue(node_id("cluster.local", "n1")), ca.bundle_pem)
    assert (await client.sign(WEB)).identity == WEB
