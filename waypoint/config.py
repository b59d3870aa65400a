"""`WaypointConfig`: everything the waypoint was started with, frozen, built once from the flags.

`from_args` is where the flags argparse cannot check alone are checked (addresses, the CA
choice, the trust bundle, the limits), each refusal a `WaypointConfigError` whose message the
process prints as it is. After that the process runs on this object, not on the
`argparse.Namespace`: typed fields, parsed addresses, the bundle already read, and nothing
that can change half-way through startup (as uvicorn's `Config`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from mesh.flows import DEFAULT_FLOW_BUFFER_SIZE
from mesh.ports import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT
from waypoint.limits import Limits

Addr = tuple[str, int]


class WaypointConfigError(ValueError):
    """A flag or a combination of flags the waypoint refuses at start."""


def parse_addr(flag: str, value: str) -> Addr:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    namespace: str
    name: str = "waypoint"
    service_account: str | None = None  # None: --name
    config: tuple[str, ...] = ()  # YAML files/dirs, reloaded live; none: no routes
    kube: bool = False  # config from the Kubernetes API server instead of --config files
    kubeconfig: str | None = None  # with kube: a kubeconfig file (None: in-cluster)
    trust_domain: str = "cluster.local"
    # the CA signing our SVID: a local directory, or the CA service with its trust bundle
    ca_dir: str | None = None
    ca: Addr | None = None
    ca_bundle: str | None = None
    ca_bundle_pem: bytes | None = None
    token_file: str = "/var/run/secrets/tokens/istio-token"
    cert_ttl: float = 24 * 3600.0
    hbone_addr: Addr = ("0.0.0.0", HBONE_PORT)
    upstream_hbone_port: int = HBONE_PORT
    metrics_addr: Addr = ("0.0.0.0", METRICS_PORT)
    readiness_addr: Addr = ("0.0.0.0", READINESS_PORT)
    admin_addr: Addr = ("127.0.0.1", ADMIN_PORT)
    flows_addr: Addr | None = None  # a read-only /flows listener besides the admin port
    log_level: str = "info"
    otlp_endpoint: Addr | None = None  # OTLP/gRPC collector for spans; None: access log only
    forwarded: bool = False  # append an RFC 7239 `Forwarded` element to forwarded requests
    trace_sampling: float = 100.0  # percent of the traces the waypoint starts that are sampled
    flow_buffer_size: int = DEFAULT_FLOW_BUFFER_SIZE  # recent flows kept (/flows); 0: off
    # what one client may cost: --max-header-bytes, --max-headers, --headers-timeout,
    # --idle-timeout, --max-concurrent-streams, --max-connections
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WaypointConfig:
        """The flags `waypoint.main.build_parser` parsed, checked in the order the waypoint
        always checked them; reads the trust bundle (a missing file is refused here, at start)."""
        limits = Limits(
            max_header_bytes=args.max_header_bytes,
            max_headers=args.max_headers,
            headers_timeout=args.headers_timeout,
            idle_timeout=args.idle_timeout,
            max_concurrent_streams=args.max_concurrent_streams,
            max_connections=args.max_connections,
        )
        try:
            limits.check()
        except ValueError as exc:
            raise WaypointConfigError(f"limits: {exc}") from None
        addrs: dict[str, Addr] = {}
        for flag in ("readiness_addr", "hbone_addr", "metrics_addr", "admin_addr"):
            addrs[flag] = _addr("--" + flag.replace("_", "-"), getattr(args, flag))
        if not 0 <= args.flow_buffer_size <= 1 << 20:
            raise WaypointConfigError("--flow-buffer-size must be 0 (off) .. 1048576")
        if args.kube and args.config:
            raise WaypointConfigError(
                "give --kube or --config, not both (one source owns the config snapshot)"
            )
        if args.kubeconfig and not args.kube:
            raise WaypointConfigError("--kubeconfig needs --kube")
        if bool(args.ca_dir) == bool(args.ca):
            raise WaypointConfigError("give --ca-dir or --ca (the CA signing our SVID)")
        ca: Addr | None = None
        bundle: bytes | None = None
        if args.ca:
            ca = _addr("--ca", args.ca)
            if not args.ca_bundle:
                raise WaypointConfigError("--ca needs --ca-bundle (the trust bundle PEM)")
            try:
                bundle = Path(args.ca_bundle).read_bytes()
            except OSError as exc:
                raise WaypointConfigError(f"--ca-bundle {args.ca_bundle}: {exc.strerror}") from None
        otlp = None
        if args.otlp_endpoint:
            otlp = _addr("--otlp-endpoint", args.otlp_endpoint)
            if otlp[1] == 0:
                raise WaypointConfigError(f"--otlp-endpoint {args.otlp_endpoint!r}: port 0")
        if not 0.0 <= args.trace_sampling <= 100.0:
            raise WaypointConfigError(
                f"--trace-sampling {args.trace_sampling:g}: expected a percentage, 0 to 100"
            )
        return cls(
            namespace=args.namespace,
            name=args.name,
            service_account=args.service_account,
            config=tuple(args.config),
            kube=bool(args.kube),
            kubeconfig=args.kubeconfig,
            trust_domain=args.trust_domain,
            ca_dir=args.ca_dir,
            ca=ca,
            ca_bundle=args.ca_bundle,
            ca_bundle_pem=bundle,
            token_file=args.token_file,
            cert_ttl=args.cert_ttl,
            upstream_hbone_port=args.upstream_hbone_port,
            hbone_addr=addrs["hbone_addr"],
            metrics_addr=addrs["metrics_addr"],
            readiness_addr=addrs["readiness_addr"],
            admin_addr=addrs["admin_addr"],
            flows_addr=_addr("--flows-addr", args.flows_addr) if args.flows_addr else None,
            log_level=args.log_level,
            limits=limits,
            otlp_endpoint=otlp,
            forwarded=args.forwarded,
            trace_sampling=args.trace_sampling,
            flow_buffer_size=args.flow_buffer_size,
        )


def _addr(flag: str, value: str) -> Addr:
    try:
        return parse_addr(flag, value)
    except argparse.ArgumentTypeError as exc:
        raise WaypointConfigError(str(exc)) from None


def host_port(addr: Addr) -> str:
    """The flag's text for an address (the parser's defaults are the config's)."""
    return f"{addr[0]}:{addr[1]}"
