"""`python -m waypoint.main`: the namespace waypoint process.

HBONE on `--hbone-addr` (15008) with the waypoint's own SPIFFE identity
(`spiffe://<td>/ns/<namespace>/sa/<service account>`, signed by the local CA in `--ca-dir`,
or by the CA service at `--ca` proving itself with its service-account token),
backends reached over HBONE through their node's ztunnel, Prometheus metrics on
`--metrics-addr`, readiness on `--readiness-addr`, `/config_dump` (config and limits) on
`--admin-addr`. The limits a hostile client meets (`waypoint.limits`) are flags whose
defaults are production values. Config comes from `--config` YAML files,
reloaded live: a bad update is logged and the last good one keeps serving; a bad config at
start is an error naming the object and field.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from certs.ca import CertificateAuthority
from mesh import process
from mesh.config.source import ConfigStore, FileSource
from mesh.identity.caclient import CaClient
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer, admin_routes
from waypoint.limits import Limits
from waypoint.proxy import Waypoint


def parse_addr(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint", description="ambientmesh namespace L7 proxy")
    p.add_argument("--name", default="waypoint", help="the waypoint Gateway's name")
    p.add_argument("--namespace", required=True)
    p.add_argument("--service-account", help="identity's service account (default: --name)")
    p.add_argument("--config", nargs="*", default=[], help="YAML files/dirs (mesh.config.parse)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--ca-dir", help="local CA directory (meshctl ca init) that signs our SVID")
    p.add_argument("--ca", help="CA service HOST:PORT (instead of --ca-dir; Kubernetes)")
    p.add_argument("--ca-bundle", help="with --ca: the trust bundle PEM")
    p.add_argument(
        "--token-file",
        "--ca-token",
        default="/var/run/secrets/tokens/istio-token",
        help="with --ca: the projected service-account token that proves who we are",
    )
    p.add_argument("--cert-ttl", type=float, default=24 * 3600.0, help="SVID lifetime (s)")
    p.add_argument("--hbone-addr", default="0.0.0.0:15008")
    p.add_argument(
        "--upstream-hbone-port", type=int, default=15008, help="backends' ztunnel HBONE port"
    )
    p.add_argument("--metrics-addr", default="0.0.0.0:15020")
    p.add_argument("--readiness-addr", default="0.0.0.0:15021")
    p.add_argument("--admin-addr", default="127.0.0.1:15000", help="/config_dump, /logging")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    d = Limits()
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


def limits_from(args: argparse.Namespace) -> Limits:
    lim = Limits(
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        headers_timeout=args.headers_timeout,
        idle_timeout=args.idle_timeout,
        max_concurrent_streams=args.max_concurrent_streams,
        max_connections=args.max_connections,
    )
    lim.check()
    return lim


async def run(args: argparse.Namespace) -> None:
    store = ConfigStore()
    source = FileSource(args.config, store, trust_domain=args.trust_domain) if args.config else None
    if source is not None:
        source.load_initial()
    ttl = timedelta(seconds=args.cert_ttl)
    if args.ca_dir:
        identities = Identities(CertificateAuthority.load(args.ca_dir), ttl)
    else:
        bundle = args.ca_bundle_pem
        client = CaClient(parse_addr("--ca", args.ca), None, bundle, token_file=args.token_file)
        identities = Identities(client, ttl, bundle_pem=bundle)
    metrics = MeshMetrics()
    metrics.info.labels("waypoint", "dev").set(1)
    wp = Waypoint(
        args.namespace,
        args.name,
        lambda: store.current,
        identities,
        trust_domain=args.trust_domain,
        service_account=args.service_account,
        metrics=metrics,
        hbone_port=args.upstream_hbone_port,
        limits=args.limits,
    )
    listener = await wp.listen(*parse_addr("--hbone-addr", args.hbone_addr))
    ready = ObservabilityServer(
        *parse_addr("--readiness-addr", args.readiness_addr), ready=lambda: True
    )
    met = ObservabilityServer(*parse_addr("--metrics-addr", args.metrics_addr), metrics=metrics)
    admin = ObservabilityServer(
        *parse_addr("--admin-addr", args.admin_addr),
        routes=admin_routes(lambda: store.current, lambda: {"limits": wp.limits.as_dict()}),
    )
    try:
        async with ready, met, admin, asyncio.TaskGroup() as tg:
            tag = f"waypoint {args.namespace}/{args.name}"
            print(f"{tag}: hbone on {wp.port} as {wp.identity}", flush=True)
            print(f"{tag}: readiness on {ready.port}", flush=True)
            print(f"{tag}: metrics on {met.port}", flush=True)
            print(f"{tag}: admin on {admin.port}", flush=True)
            logging.getLogger("waypoint").info("limits: %s", wp.limits.as_dict())
            if source is not None:
                tg.create_task(source.run())
            tg.create_task(identities.run())
            await asyncio.Event().wait()
    finally:
        listener.close()
        await wp.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.limits = limits_from(args)
    except ValueError as exc:
        print(f"waypoint: limits: {exc}", file=sys.stderr)
        return 2
    for flag in ("readiness_addr", "hbone_addr", "metrics_addr", "admin_addr"):
        try:
            parse_addr("--" + flag.replace("_", "-"), getattr(args, flag))
        except argparse.ArgumentTypeError as exc:
            print(f"waypoint: {exc}", file=sys.stderr)
            return 2
    if bool(args.ca_dir) == bool(args.ca):
        print("waypoint: give --ca-dir or --ca (the CA signing our SVID)", file=sys.stderr)
        return 2
    if args.ca:
        try:
            parse_addr("--ca", args.ca)
        except argparse.ArgumentTypeError as exc:
            print(f"waypoint: {exc}", file=sys.stderr)
            return 2
        if not args.ca_bundle:
            print("waypoint: --ca needs --ca-bundle (the trust bundle PEM)", file=sys.stderr)
            return 2
        try:
            args.ca_bundle_pem = Path(args.ca_bundle).read_bytes()
        except OSError as exc:
            print(f"waypoint: --ca-bundle {args.ca_bundle}: {exc.strerror}", file=sys.stderr)
            return 2
    logging.getLogger("waypoint").setLevel(args.log_level.upper())
    return process.run("waypoint", run(args), log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
