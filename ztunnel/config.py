"""`ZtunnelConfig`: everything the process was started with, frozen, built once from the flags.

The command line is parsed and checked in `ztunnel.main` (the flags, their defaults and the
combinations refused at start live there, beside `--help`). What the process then runs on is
this object, not the `argparse.Namespace`: its fields are typed, so mypy sees every use; it
cannot be changed half-way through startup; and a test or a benchmark can start the process
from a config it builds itself, without a command line (as uvicorn's `Config`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mesh.flows import DEFAULT_FLOW_BUFFER_SIZE
from mesh.hbone import HboneLimits
from mesh.ports import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ZtunnelConfig:
    node: str
    # config source: YAML files (reloaded live) or the Kubernetes API
    config: tuple[str, ...] = ()
    kube: bool = False
    kubeconfig: str | None = None
    trust_domain: str = "cluster.local"
    # certificates: a local CA directory, or the CA service with a bundle and a credential
    ca_dir: str | None = None
    ca: Addr | None = None
    ca_bundle: str | None = None
    node_cert: str | None = None
    ca_token: str | None = None
    cert_ttl: float = 24 * 3600.0
    # listeners
    hbone_addr: Addr = ("0.0.0.0", HBONE_PORT)
    outbound_addr: Addr | None = None
    inbound_plaintext_addr: Addr | None = None
    admin_addr: Addr = ("127.0.0.1", ADMIN_PORT)
    flows_addr: Addr | None = None  # a read-only /flows listener besides the admin port
    metrics_addr: Addr = ("0.0.0.0", METRICS_PORT)
    readiness_addr: Addr = ("0.0.0.0", READINESS_PORT)
    # in-pod listeners and redirection
    enrol_socket: str | None = None
    redirect: str = "none"
    bpf_pin_root: str | None = None
    bpf_cgroup: str | None = None
    # HBONE pool and shutdown
    stream_cap: int = 100
    pool_idle: float = 60.0
    drain_timeout: float = 5.0
    # what one peer may cost this node: --handshake-timeout, --max-streams,
    # --max-header-list-size, --hbone-idle-timeout, --max-connections-per-peer,
    # --max-connections; and the upstream dials under way at once
    limits: HboneLimits = field(default_factory=HboneLimits)
    max_pending_dials: int = 1024
    flow_buffer_size: int = DEFAULT_FLOW_BUFFER_SIZE  # recent flows kept; 0: not recorded
    log_level: str = "info"
    log_format: str = "text"
    # kTLS: the operator's choice, and what it resolved to on this kernel at start
    ktls: str = "auto"
    fastpath: str = "auto"  # same-node sockmap splice: auto | on | off
    local_delivery: bool = True  # meshed same-node connections skip HBONE
    ktls_enabled: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, ktls_enabled: bool) -> ZtunnelConfig:
        """The flags `ztunnel.main.build_parser` parsed and `check_args` accepted."""
        return cls(
            node=args.node,
            config=tuple(args.config or ()),
            kube=args.kube,
            kubeconfig=args.kubeconfig,
            trust_domain=args.trust_domain,
            ca_dir=args.ca_dir,
            ca=args.ca,
            ca_bundle=args.ca_bundle,
            node_cert=args.node_cert,
            ca_token=args.ca_token,
            cert_ttl=args.cert_ttl,
            hbone_addr=args.hbone_addr,
            outbound_addr=args.outbound_addr,
            inbound_plaintext_addr=args.inbound_plaintext_addr,
            admin_addr=args.admin_addr,
            flows_addr=args.flows_addr,
            metrics_addr=args.metrics_addr,
            readiness_addr=args.readiness_addr,
            enrol_socket=args.enrol_socket,
            redirect=args.redirect,
            bpf_pin_root=args.bpf_pin_root,
            bpf_cgroup=args.bpf_cgroup,
            stream_cap=args.stream_cap,
            pool_idle=args.pool_idle,
            drain_timeout=args.drain_timeout,
            limits=HboneLimits(
                handshake_timeout=args.handshake_timeout,
                max_streams=args.max_streams,
                max_header_list_size=args.max_header_list_size,
                idle_timeout=args.hbone_idle_timeout,
                max_connections_per_peer=args.max_connections_per_peer,
                max_connections=args.max_connections,
            ),
            max_pending_dials=args.max_pending_dials,
            flow_buffer_size=args.flow_buffer_size,
            log_level=args.log_level,
            log_format=args.log_format,
            ktls=args.ktls,
            fastpath=args.fastpath,
            local_delivery=args.local_delivery == "on",
            ktls_enabled=ktls_enabled,
        )
