"""The sidecar baseline: a real Envoy in a pod's network namespace, as Istio's sidecar mode runs it.

What the ambient mesh is compared against has to be the real thing, configured the way users
run it, or the comparison flatters us. So, as in Istio's sidecar mode:
- netfilter rules inside the pod's netns send every outbound TCP connection to Envoy's :15001
  and every inbound one to :15006; Envoy's own connections carry socket mark 0x539 and are
  exempt (Istio exempts its proxy by uid; in the lab everything runs as root, so a mark);
- both listeners recover the original destination (the `original_dst` listener filter) and
  are HTTP connection managers, so each request crosses two full L7 proxies;
- sidecar to sidecar is mutual TLS with the pods' SPIFFE certificates from our CA, HTTP/2
  with ALPN h2, and the peer's certificate must be in our trust domain.

This module only renders configuration and rules; the benchmark harness starts the processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ENVOY_MARK = 0x539
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
SO_MARK = 36
SOL_SOCKET = 1
_T = "type.googleapis.com/envoy.extensions."


@dataclass(frozen=True)
class SidecarFiles:
    """PEM files of the pod's SVID, as `meshctl ca issue` writes them."""

    chain: str
    key: str
    bundle: str


def _tls_context(files: SidecarFiles, trust_domain: str) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {"certificate_chain": {"filename": files.chain}, "private_key": {"filename": files.key}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": files.bundle},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
            ],
        },
        "alpn_protocols": ["h2"],
    }


def _marked_bind() -> dict[str, Any]:
    """Envoy's upstream sockets carry the mark the capture rules exempt: no redirect loop."""
    return {
        "source_address": {"address": "0.0.0.0", "port_value": 0},
        "socket_options": [
            {
                "level": SOL_SOCKET,
                "name": SO_MARK,
                "int_value": ENVOY_MARK,
                "state": "STATE_PREBIND",
            }
        ],
    }


def _hcm(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": cluster, "timeout": "0s"},
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
                }
            ],
        },
    }


_ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
    },
}


def bootstrap(
    files: SidecarFiles, *, admin_port: int, trust_domain: str = "cluster.local"
) -> dict[str, Any]:
    """Envoy bootstrap for one pod's sidecar (static config; no control plane in the lab)."""
    tls = _tls_context(files, trust_domain)
    h2_options = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {
                        "socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}
                    },
                    "listener_filters": [_ORIGINAL_DST_FILTER],
                    "filter_chains": [{"filters": [_hcm("outbound", "outbound_mtls")]}],
                },
                {
                    "name": "inbound",
                    "address": {
                        "socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}
                    },
                    "listener_filters": [_ORIGINAL_DST_FILTER],
                    "filter_chains": [
                        {
                            "filters": [_hcm("inbound", "inbound_app")],
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": tls,
                                },
                            },
                        }
                    ],
                },
            ],
            "clusters": [
                {
                    # Sidecar to sidecar: to wherever the app connected, over mTLS + HTTP/2.
                    "name": "outbound_mtls",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                    "upstream_bind_config": _marked_bind(),
                    "typed_extension_protocol_options": h2_options,
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
                            "common_tls_context": tls,
                        },
                    },
                },
                {
                    # Inbound: to the app at the original destination, plain HTTP/1.1.
                    "name": "inbound_app",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                    "upstream_bind_config": _marked_bind(),
                },
            ],
        },
    }


def capture_rules(exclude_inbound_ports: tuple[int, ...] = ()) -> list[list[str]]:
    """`iptables` argument lists (nat table) to run inside the pod's netns, in order."""
    mark = hex(ENVOY_MARK)
    excluded = ",".join(str(p) for p in (OUTBOUND_PORT, INBOUND_PORT, *exclude_inbound_ports))
    return [
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "RETURN"],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT",
         "--to-ports", str(OUTBOUND_PORT)],
        [
            "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "!", "-i", "lo",
            "-m", "multiport", "!", "--dports", excluded,
            "-j", "REDIRECT", "--to-ports", str(INBOUND_PORT),
        ],
    ]  # fmt: skip
