"""The Envoy configuration both Envoy peers of the benchmark build the same way: the mesh's
mTLS context (TLS 1.3 only, SPIFFE SAN matching, ALPN h2, as ztunnel speaks HBONE) and a
static HTTP/2 cluster to a ztunnel's HBONE port. Kept in one place so that the node-Envoy and
Envoy-waypoint modes cannot drift apart in how they reach a ztunnel."""

from __future__ import annotations

from typing import Any

from mesh.ports import HBONE_PORT

EXT = "type.googleapis.com/envoy.extensions."


def mesh_tls(chain: str, key: str, bundle: str, san: dict[str, str]) -> dict[str, Any]:
    """A `common_tls_context` presenting the SVID in `chain`/`key` and accepting a peer whose
    URI SAN matches `san` (an Envoy StringMatcher: exact identity or trust-domain prefix)."""
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {"certificate_chain": {"filename": chain}, "private_key": {"filename": key}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": bundle},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
        "alpn_protocols": ["h2"],
    }


def hbone_cluster(name: str, address: str, tls: dict[str, Any]) -> dict[str, Any]:
    """A static cluster speaking HTTP/2 over mTLS (`tls`, from `mesh_tls`) to the HBONE port
    at `address`: what carries Envoy's CONNECT tunnels to a ztunnel."""
    endpoint = {"address": {"socket_address": {"address": address, "port_value": HBONE_PORT}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": EXT + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": EXT + "transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls,
            },
        },
    }
