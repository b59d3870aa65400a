"""The `envoy-waypoint` peer: a real Envoy as the namespace's waypoint, which is what Istio runs,
in place of ours and nothing else changed: the same lab, the same ztunnels sending to it, the
same HTTPRoute (80/20 between two backend Services), so the comparison isolates the waypoint.

Its shape follows Istio's waypoint (an Envoy terminating HBONE and routing HTTP):
- `:15008` in the waypoint pod takes HBONE: mTLS with an SVID of the waypoint's service account
  from the lab's own CA (ztunnel checks it is the waypoint's identity), a client certificate in
  the trust domain required, HTTP/2 CONNECTs to the Service's VIP:port terminated;
- the tunnelled bytes re-enter Envoy through an internal listener (`main_internal`) whose HTTP
  connection manager carries the HTTPRoute as a route with weighted clusters;
- each backend Service's cluster leads, through an internal listener of its own, to a tcp_proxy
  that tunnels to the backend pod's node over HBONE (HTTP/2 CONNECT, mTLS, the node ztunnel's
  identity checked), with the pod's address as the CONNECT authority, as ztunnel expects.

Pod addresses and the lab's CA exist only once the lab is up, so the waypoint Envoy starts with
empty listener and cluster files (`bootstrap`) that `configure` fills in afterwards; Envoy
watches them. The route is rendered from the benchmark's own HTTPRoute (`benchmarks.modes`),
not read from the API server: that is the one thing a control plane would do here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.envoy_xds import hbone_cluster, mesh_tls
from mesh.ports import ADMIN_PORT, HBONE_PORT

_T = "type.googleapis.com/envoy.extensions."
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
HBONE_LISTENER = "hbone"
MAIN = "main_internal"
IN_STATS = "wp_hbone"
ROUTE_STATS = "wp_http"


@dataclass(frozen=True, slots=True)
class Backend:
    """A backendRef of the HTTPRoute, resolved: its Service name, weight, and the one pod
    behind it (pod address:port is the CONNECT authority; the node is where HBONE goes)."""

    service: str
    weight: int
    pod_ip: str
    port: int
    node_ip: str
    node_identity: str


@dataclass(frozen=True, slots=True)
class Svid:
    chain: str
    key: str
    bundle: str


def _tls(svid: Svid, san: dict[str, str]) -> dict[str, Any]:
    return mesh_tls(svid.chain, svid.key, svid.bundle, san)


def _router() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
        }
    ]


def _internal_endpoint(cluster: str, listener: str) -> dict[str, Any]:
    return {
        "cluster_name": cluster,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"envoy_internal_address": {
                        "server_listener_name": listener}}}}
                ]
            }
        ],
    }  # fmt: skip


def listeners(
    vip: str, port: int, backends: list[Backend], svid: Svid, trust_domain: str
) -> list[dict[str, Any]]:
    hbone_hcm = {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": IN_STATS,
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "services",
                    # the Services this waypoint serves, by the VIP:port ztunnel puts in the
                    # authority; anything else is not routed (404)
                    "domains": [f"{vip}:{port}"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": MAIN,
                                "timeout": "0s",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": _router(),
    }
    hbone = {
        "@type": LISTENER,
        "name": HBONE_LISTENER,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager",
                     "typed_config": hbone_hcm}
                ],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": _tls(
                            svid, {"prefix": f"spiffe://{trust_domain}/"}
                        ),
                    },
                },
            }
        ],
    }  # fmt: skip
    main_hcm = {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": ROUTE_STATS,
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "httproute",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "timeout": "0s",
                                "weighted_clusters": {
                                    "clusters": [
                                        {"name": f"svc|{b.service}", "weight": b.weight}
                                        for b in backends
                                    ]
                                },
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": _router(),
    }
    main = {
        "@type": LISTENER,
        "name": MAIN,
        "internal_listener": {},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": main_hcm}]}
        ],
    }  # fmt: skip
    out = [hbone, main]
    for b in backends:
        out.append(
            {
                "@type": LISTENER,
                "name": f"originate|{b.service}",
                "internal_listener": {},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": _T + "filters.network.tcp_proxy.v3.TcpProxy",
                                    "stat_prefix": f"originate_{b.service}",
                                    "cluster": f"hbone|{b.service}",
                                    "tunneling_config": {"hostname": f"{b.pod_ip}:{b.port}"},
                                },
                            }
                        ]
                    }
                ],
            }
        )
    return out


def clusters(backends: list[Backend], svid: Svid) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "@type": CLUSTER,
            "name": MAIN,
            "connect_timeout": "5s",
            "load_assignment": _internal_endpoint(MAIN, MAIN),
        }
    ]
    for b in backends:
        out.append(
            {
                "@type": CLUSTER,
                "name": f"svc|{b.service}",
                "connect_timeout": "5s",
                "load_assignment": _internal_endpoint(f"svc|{b.service}", f"originate|{b.service}"),
            }
        )
        tls = _tls(svid, {"exact": b.node_identity})
        hbone = hbone_cluster(f"hbone|{b.service}", b.node_ip, tls)
        out.append({"@type": CLUSTER, **hbone})
    return out


def bootstrap(workdir: Path, admin_port: int = ADMIN_PORT) -> dict[str, Any]:
    """Admin on the pod's loopback, internal listeners on, listeners and clusters from files
    in `workdir` (written empty here; `configure` fills them once the lab is up)."""
    lds, cds = workdir / "lds.json", workdir / "cds.json"
    for f in (lds, cds):
        if not f.exists():
            f.write_text(json.dumps({"resources": []}))
    watch = {"path": str(workdir)}
    return {
        "node": {"id": "envoy-waypoint", "cluster": "envoy-waypoint"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": _T + "bootstrap.internal_listener.v3.InternalListener",
                },
            }
        ],
        "dynamic_resources": {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(lds), "watched_directory": watch},
            },
            "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(cds), "watched_directory": watch},
            },
        },
    }


def _write(path: Path, resources: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"resources": resources}, indent=1))
    os.replace(tmp, path)


def issue_svid(ca_dir: Path, workdir: Path, identity: str) -> Svid:
    """The waypoint's SVID from the lab's own CA (the one ztunnel trusts)."""
    from certs.ca import CertificateAuthority

    ca = CertificateAuthority.load(ca_dir)
    svid = ca.issue(identity, timedelta(hours=2))
    chain, key, bundle = workdir / "wp-chain.pem", workdir / "wp-key.pem", workdir / "bundle.pem"
    chain.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    bundle.write_bytes(ca.bundle_pem)
    return Svid(str(chain), str(key), str(bundle))


def configure(
    workdir: Path,
    *,
    vip: str,
    port: int,
    backends: list[Backend],
    svid: Svid,
    trust_domain: str,
) -> None:
    """Clusters first (the listeners name them), then listeners, each an atomic rename."""
    _write(workdir / "cds.json", clusters(backends, svid))
    _write(workdir / "lds.json", listeners(vip, port, backends, svid, trust_domain))
