"""`python -m waypoint.main`: the namespace waypoint process.

HBONE on `--hbone-addr` (15008) with the waypoint's own SPIFFE identity
(`spiffe://<td>/ns/<namespace>/sa/<service account>`, signed by the local CA in `--ca-dir`,
or by the CA service at `--ca` proving itself with its service-account token),
backends reached over HBONE through their node's ztunnel, Prometheus metrics on
`--metrics-addr`, readiness on `--readiness-addr`. Config comes from `--config` YAML files,
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
from certs.service import CaClient
from mesh import process
from mesh.config.source import ConfigStore, FileSource
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer
from waypoint.proxy import Waypoint
from ztunnel.identity import Identities


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


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
    )
    listener = await wp.listen(*parse_addr("--hbone-addr", args.hbone_addr))
    ready = ObservabilityServer(
        *parse_addr("--readiness-addr", args.readiness_addr), ready=lambda: True
    )
    met = ObservabilityServer(*parse_addr("--metrics-addr", args.metrics_addr), metrics=metrics)
    try:
        async with ready, met, asyncio.TaskGroup() as tg:
            tag = f"waypoint {args.namespace}/{args.name}"
            print(f"{tag}: hbone on {wp.port} as {wp.identity}", flush=True)
            print(f"{tag}: readiness on {ready.port}", flush=True)
            print(f"{tag}: metrics on {met.port}", flush=True)
            if source is not None:
                tg.create_task(source.run())
            tg.create_task(identities.run())
            await asyncio.Event().wait()
    finally:
        listener.close()
        await wp.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("readiness_addr", "hbone_addr", "metrics_addr"):
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
