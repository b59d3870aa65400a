"""`ztunnel`: the node proxy process.

This build takes SVIDs from a local CA directory (`--ca-dir`: single host, lab, tests); the CA
service client with rotation plugs into `ztunnel.proxy.Identities`. Listeners are node-level;
in-pod listeners (opened inside each pod's netns at enrolment) come with the enrolment API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from certs.ca import CertificateAuthority
from mesh import ktls, process
from mesh.config.source import ConfigStore, FileSource
from mesh.hbone import serve
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer, admin_routes
from ztunnel.proxy import Identities, InboundHbone, InboundPlaintext, Node, Outbound

log = logging.getLogger("ztunnel")


def addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel", description="ambientmesh node proxy")
    p.add_argument("--node", required=True, help="this node's name, as pods' spec.nodeName")
    p.add_argument("--config", nargs="+", required=True, help="YAML files or directories")
    p.add_argument("--ca-dir", required=True, help="local CA directory (meshctl ca init)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--hbone-addr", type=addr, default=("0.0.0.0", 15008))
    p.add_argument("--outbound-addr", type=addr, help="node-level outbound listener (15001)")
    p.add_argument("--inbound-plaintext-addr", type=addr, help="node-level 15006 listener")
    p.add_argument("--admin-addr", type=addr, default=("127.0.0.1", 15000))
    p.add_argument("--metrics-addr", type=addr, default=("0.0.0.0", 15020))
    p.add_argument("--readiness-addr", type=addr, default=("0.0.0.0", 15021))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--ktls",
        default="auto",
        choices=[m.value for m in ktls.KtlsMode],
        help="TLS record layer in the kernel: auto (when it can), on (or refuse to start), off",
    )
    return p


async def run(args: argparse.Namespace) -> None:
    store = ConfigStore()
    source = FileSource(args.config, store, trust_domain=args.trust_domain)
    source.load_initial()
    ca = CertificateAuthority.load(args.ca_dir)
    ids = Identities(ca, ktls=args.ktls_enabled)
    metrics = MeshMetrics()
    metrics.ktls_enabled.set(1 if args.ktls_enabled else 0)
    node = Node(
        args.node,
        lambda: store.current,
        ids,
        metrics,
        trust_domain=args.trust_domain,
        hbone_port=args.hbone_addr[1],
    )
    loop = asyncio.get_running_loop()
    servers = [
        await serve(
            args.hbone_addr[0],
            args.hbone_addr[1],
            ids.listener_context(node.identity),
            InboundHbone(node),
            trust_domain=args.trust_domain,
        )
    ]
    if args.outbound_addr:
        servers.append(await loop.create_server(Outbound(node).protocol, *args.outbound_addr))
    if args.inbound_plaintext_addr:
        servers.append(
            await loop.create_server(InboundPlaintext(node).protocol, *args.inbound_plaintext_addr)
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    routes = admin_routes(
        lambda: store.current,
        extra=lambda: {
            "node": args.node,
            "certificates": ids.dump(),
            "ktls": ktls.describe(args.ktls),
        },
    )
    async with (
        ObservabilityServer(*args.admin_addr, routes=routes) as admin,
        ObservabilityServer(*args.metrics_addr, metrics=metrics) as met,
        ObservabilityServer(*args.readiness_addr, ready=lambda: True) as ready,
        asyncio.TaskGroup() as tg,
    ):
        watcher = tg.create_task(source.run())
        log.info(
            "ztunnel %s ready: hbone %s, admin %d, metrics %d, readiness %d",
            args.node,
            servers[0].sockets[0].getsockname()[1],
            admin.port,
            met.port,
            ready.port,
        )
        print(
            f"ready hbone={servers[0].sockets[0].getsockname()[1]} admin={admin.port} "
            f"metrics={met.port} readiness={ready.port}",
            flush=True,
        )
        await stop.wait()
        for s in servers:
            s.close()
        for t in node.tasks:
            t.cancel()
        node.pool.close()
        watcher.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.ktls_enabled = ktls.resolve(args.ktls)
    except ktls.KtlsUnavailableError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 2
    return process.run("ztunnel", run(args), log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
