"""`python -m waypoint.main`: the namespace waypoint process.

HBONE on `--hbone-addr` (15008) with the waypoint's own SPIFFE identity
(`spiffe://<td>/ns/<namespace>/sa/<service account>`, signed by the local CA in `--ca-dir`,
or by the CA service at `--ca` proving itself with its service-account token),
backends reached over HBONE through their node's ztunnel, Prometheus metrics on
`--metrics-addr`, readiness on `--readiness-addr`, `/config_dump` (config and limits) on
`--admin-addr`. The limits a hostile client meets (`waypoint.limits`) are flags whose
defaults are production values. Config comes from `--config` YAML files,
reloaded live: a bad update is logged and the last good one keeps serving; a bad config at
start is an error naming the object and field. Or, on Kubernetes, from the API server
(`--kube`): the same `KubeSource` as ztunnel's with the waypoint's kinds
(`mesh.config.kube.WAYPOINT_KINDS`: ztunnel's plus RequestAuthentication and the ConfigMaps
labelled `ambientmesh.io/jwks`); HBONE opens and readiness turns ready only once the first
full snapshot is out, so a waypoint never serves a request without its routes and policies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from certs.ca import CertificateAuthority
from mesh import otlp, process
from mesh.config.source import ConfigStore, FileSource
from mesh.flows import FlowRing, flows_route
from mesh.hbone.pool import Listener
from mesh.identity.caclient import CaClient
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer, admin_routes
from mesh.otlp import OtlpExporter
from mesh.ports import FLOWS_PORT
from waypoint.config import WaypointConfig, WaypointConfigError, host_port
from waypoint.proxy import Waypoint

if TYPE_CHECKING:
    from mesh.config.kube import KubeSource

log = logging.getLogger("waypoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint", description="ambientmesh namespace L7 proxy")
    c = WaypointConfig(namespace="")  # the defaults live once, in the config the flags fill
    p.add_argument("--name", default=c.name, help="the waypoint Gateway's name")
    p.add_argument("--namespace", required=True)
    p.add_argument("--service-account", help="identity's service account (default: --name)")
    p.add_argument("--config", nargs="*", default=[], help="YAML files/dirs (mesh.config.parse)")
    p.add_argument(
        "--kube",
        action="store_true",
        help="watch the Kubernetes API server for config (instead of --config)",
    )
    p.add_argument("--kubeconfig", help="with --kube: a kubeconfig (default: in-cluster)")
    p.add_argument("--trust-domain", default=c.trust_domain)
    p.add_argument("--ca-dir", help="local CA directory (meshctl ca init) that signs our SVID")
    p.add_argument("--ca", help="CA service HOST:PORT (instead of --ca-dir; Kubernetes)")
    p.add_argument("--ca-bundle", help="with --ca: the trust bundle PEM")
    p.add_argument(
        "--token-file",
        "--ca-token",
        default=c.token_file,
        help="with --ca: the projected service-account token that proves who we are",
    )
    p.add_argument("--cert-ttl", type=float, default=c.cert_ttl, help="SVID lifetime (s)")
    p.add_argument("--hbone-addr", default=host_port(c.hbone_addr))
    p.add_argument(
        "--upstream-hbone-port",
        type=int,
        default=c.upstream_hbone_port,
        help="backends' ztunnel HBONE port",
    )
    p.add_argument("--metrics-addr", default=host_port(c.metrics_addr))
    p.add_argument("--readiness-addr", default=host_port(c.readiness_addr))
    p.add_argument("--admin-addr", default=host_port(c.admin_addr), help="/config_dump, /logging")
    p.add_argument(
        "--flows-addr",
        help="also serve the flow stream (only /flows, read-only) here, e.g. for the API "
        f"server's pods/proxy (0.0.0.0:{FLOWS_PORT}); default: admin port only",
    )
    p.add_argument(
        "--flow-buffer-size",
        type=int,
        default=c.flow_buffer_size,
        help="recent flows kept for `meshctl observe` (admin /flows); 0 turns recording off",
    )
    p.add_argument(
        "--log-level", default=c.log_level, choices=["debug", "info", "warning", "error"]
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="OTLP/gRPC collector for one span per request (needs the 'otlp' extra); "
        "without it, trace and span ids go to the access log only",
    )
    p.add_argument(
        "--trace-sampling",
        type=float,
        default=c.trace_sampling,
        metavar="PERCENT",
        help="of the traces the waypoint starts (requests without a valid traceparent), the "
        "percentage sampled (exported as spans); a caller's own decision is always kept",
    )
    p.add_argument(
        "--forwarded",
        action="store_true",
        help="append an RFC 7239 Forwarded element (for=, by=, proto=) to forwarded requests",
    )
    d = c.limits
    lim = p.add_argument_group("limits (what one client may cost; past them: refused)")
    lim.add_argument(
        "--max-header-bytes",
        type=int,
        default=d.max_header_bytes,
        help="request target and header section, bytes (431/414 past it)",
    )
    lim.add_argument(
        "--max-headers", type=int, default=d.max_headers, help="header fields per request (431)"
    )
    lim.add_argument(
        "--headers-timeout",
        type=float,
        default=d.headers_timeout,
        help="seconds from a request's first byte to its complete head (408)",
    )
    lim.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout,
        help="seconds a connection may stay without requests or bytes",
    )
    lim.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=d.max_concurrent_streams,
        help="HTTP/2 streams per connection (REFUSED_STREAM past it)",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="downstream connections (CONNECT streams) at once (503 past it)",
    )
    return p  # fmt: skip


async def run(config: WaypointConfig) -> None:
    store = ConfigStore()
    source: FileSource | KubeSource | None = None
    kube_api = None
    if config.config:
        source = FileSource(config.config, store, trust_domain=config.trust_domain)
        source.load_initial()
    elif config.kube:
        # imported here: kubernetes_asyncio is needed only on a cluster
        from mesh.config.kube import WAYPOINT_KINDS, KubeSource, load_api_client

        kube_api = await load_api_client(config.kubeconfig)
        source = KubeSource(kube_api, store, trust_domain=config.trust_domain, kinds=WAYPOINT_KINDS)
    try:
        await _serve(config, store, source)
    finally:
        if kube_api is not None:
            await kube_api.close()


def _first_snapshot(source: FileSource | KubeSource | None) -> asyncio.Event | None:
    """Files load before anything listens; the API server's first snapshot comes later."""
    return None if source is None or isinstance(source, FileSource) else source.ready


async def _serve(
    config: WaypointConfig, store: ConfigStore, source: FileSource | KubeSource | None
) -> None:
    ttl = timedelta(seconds=config.cert_ttl)
    if config.ca_dir:
        identities = Identities(CertificateAuthority.load(config.ca_dir), ttl)
    else:
        # from_args: --ca-dir or --ca, and --ca comes with its bundle
        assert config.ca is not None and config.ca_bundle_pem is not None
        bundle = config.ca_bundle_pem
        client = CaClient(config.ca, None, bundle, token_file=config.token_file)
        identities = Identities(client, ttl, bundle_pem=bundle)
    metrics = MeshMetrics()
    metrics.info.labels("waypoint", "dev").set(1)
    exporter = None
    if config.otlp_endpoint is not None:
        exporter = OtlpExporter(
            config.otlp_endpoint,
            resource={
                "service.name": f"{config.name}.{config.namespace}",
                "k8s.namespace.name": config.namespace,
            },
            registry=metrics.registry,
            scope="ambientmesh.waypoint",
        )
        exporter.start()  # main() checked that the extra is installed
    flows = FlowRing(
        config.flow_buffer_size,
        node=os.environ.get("NODE_NAME", ""),
        proxy=f"waypoint-{config.namespace}-{config.name}",
    )
    wp = Waypoint(
        config.namespace,
        config.name,
        lambda: store.current,
        identities,
        trust_domain=config.trust_domain,
        service_account=config.service_account,
        metrics=metrics,
        hbone_port=config.upstream_hbone_port,
        limits=config.limits,
        exporter=exporter,
        forwarded=config.forwarded,
        trace_sampling=config.trace_sampling / 100.0,
        flows=flows,
    )
    listener: Listener | None = None
    first = _first_snapshot(source)
    ready = ObservabilityServer(
        *config.readiness_addr, ready=lambda: first is None or first.is_set()
    )
    met = ObservabilityServer(*config.metrics_addr, metrics=metrics)
    admin = ObservabilityServer(
        *config.admin_addr,
        routes=admin_routes(lambda: store.current, lambda: {"limits": wp.limits.as_dict()}),
        streams={"/flows": flows_route(flows)},
    )
    flows_srv = (
        ObservabilityServer(*config.flows_addr, streams={"/flows": flows_route(flows)})
        if config.flows_addr is not None
        else None
    )
    try:
        async with ready, met, admin, asyncio.TaskGroup() as tg:
            if flows_srv is not None:
                await flows_srv.start()
            if source is not None:
                tg.create_task(source.run())
            if first is not None:
                log.info("waiting for the first config snapshot from the API server")
                await first.wait()
            listener = await wp.listen(*config.hbone_addr)
            tag = f"waypoint {config.namespace}/{config.name}"
            print(f"{tag}: hbone on {wp.port} as {wp.identity}", flush=True)
            print(f"{tag}: readiness on {ready.port}", flush=True)
            print(f"{tag}: metrics on {met.port}", flush=True)
            print(f"{tag}: admin on {admin.port}", flush=True)
            if flows_srv is not None:
                print(f"{tag}: flows on {flows_srv.port}", flush=True)
            log.info("limits: %s", wp.limits.as_dict())
            tg.create_task(identities.run())
            await asyncio.Event().wait()
    finally:
        if flows_srv is not None:
            await flows_srv.close()
        if listener is not None:
            listener.close()
        await wp.close()
        if exporter is not None:
            await asyncio.to_thread(exporter.close)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = WaypointConfig.from_args(args)
    except WaypointConfigError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        return 2
    if config.otlp_endpoint is not None:
        try:
            otlp.require()
        except otlp.OtlpUnavailable as exc:
            print(f"waypoint: --otlp-endpoint: {exc}", file=sys.stderr)
            return 2
    logging.getLogger("waypoint").setLevel(config.log_level.upper())
    return process.run("waypoint", run(config), log_level=config.log_level)


if __name__ == "__main__":
    sys.exit(main())
