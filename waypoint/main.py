"""`python -m waypoint.main`: the namespace waypoint process.

This build serves HTTP/1.1 on a plaintext development listener (`--http-addr`, one Service
authority given by `--authority`) plus readiness and metrics; the HBONE listener
(`--hbone-addr`) and SVID options attach when the HBONE core is in. Config comes from
`--config` YAML files, reloaded live: a bad update is logged and the last good one keeps
serving; a bad config at start is an error naming the object and field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

from mesh import process
from mesh.config.source import ConfigStore, FileSource
from mesh.metrics import MeshMetrics
from mesh.observability import ObservabilityServer
from waypoint.http1 import serialize_response
from waypoint.proxy import WaypointStreams
from waypoint.service import ServiceRoutes, Target


def parse_addr(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint", description="ambientmesh namespace L7 proxy")
    p.add_argument("--name", default="waypoint")
    p.add_argument("--namespace", required=True)
    p.add_argument("--config", nargs="*", default=[], help="YAML files/dirs (mesh.config.parse)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--hbone-addr", default="0.0.0.0:15008")
    p.add_argument("--metrics-addr", default="0.0.0.0:15020")
    p.add_argument("--readiness-addr", default="0.0.0.0:15021")
    p.add_argument("--http-addr", help="plaintext HTTP/1.1 development listener HOST:PORT")
    p.add_argument("--authority", help="Service VIP:PORT the development listener serves")
    return p


class Routes:
    """The route tables of the current snapshot, rebuilt only when the snapshot changes."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store
        self._routes = ServiceRoutes(store.current)

    def __call__(self) -> ServiceRoutes:
        snap = self.store.current
        if self._routes.snapshot is not snap:
            self._routes = ServiceRoutes(snap)
            for err in self._routes.errors:
                logging.getLogger("waypoint").error("route dropped: %s", err)
        return self._routes


async def run(args: argparse.Namespace) -> None:
    store = ConfigStore()
    source = FileSource(args.config, store, trust_domain=args.trust_domain) if args.config else None
    if source is not None:
        source.load_initial()
    routes = Routes(store)

    async def dial(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(t.ip, t.port)

    streams = WaypointStreams(routes, dial)

    async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = streams.for_authority(args.authority or "")
        if s is None:
            # Read the request head first: closing with unread input makes the kernel send a
            # RST, which can destroy the 503 before the client reads it.
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                     ConnectionError, TimeoutError):  # fmt: skip
                await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            body = f"service {args.authority} not found in config\n".encode()
            w.write(serialize_response(503, [("content-type", "text/plain")], body, False))
            await w.drain()
            w.close()
            return
        await s.serve(r, w)

    obs = ObservabilityServer(
        *parse_addr("--readiness-addr", args.readiness_addr),
        metrics=MeshMetrics(),
        ready=lambda: True,
    )
    async with obs, asyncio.TaskGroup() as tg:
        print(f"waypoint {args.namespace}/{args.name}: readiness on {obs.port}", flush=True)
        if args.http_addr:
            server = await asyncio.start_server(http, *parse_addr("--http-addr", args.http_addr))
            port = server.sockets[0].getsockname()[1]
            print(f"waypoint {args.namespace}/{args.name}: http on {port}", flush=True)
        if source is not None:
            tg.create_task(source.run())
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("readiness_addr", "hbone_addr", "metrics_addr"):
        try:
            parse_addr("--" + flag.replace("_", "-"), getattr(args, flag))
        except argparse.ArgumentTypeError as exc:
            print(f"waypoint: {exc}", file=sys.stderr)
            return 2
    return process.run("waypoint", run(args), log_level="info")


if __name__ == "__main__":
    sys.exit(main())
