"""`python -m waypoint.main`: the namespace waypoint process.

This build serves HTTP/1.1 on a plaintext development listener (`--http-addr`, one Service
authority given by `--authority`) plus readiness; the HBONE listener (`--hbone-addr`), SVID
options and metrics attach when the core, certs and config helpers' modules are in main. The
config comes from `--config` YAML through mesh.config.parse once that lands; without it the
snapshot is empty and every request gets the Service-not-found answer.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from mesh.config.snapshot import Snapshot
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


def load_snapshot(paths: Sequence[str]) -> Snapshot:
    if not paths:
        return Snapshot()
    try:
        parse = importlib.import_module("mesh.config.parse")  # from the config helper
    except ImportError as exc:
        raise SystemExit("waypoint: --config needs mesh.config.parse, not in this build") from exc
    snap: Snapshot = parse.load_snapshot(paths)
    return snap


async def run(args: argparse.Namespace) -> None:
    routes = ServiceRoutes(load_snapshot(args.config))

    async def dial(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(t.ip, t.port)

    streams = WaypointStreams(lambda: routes, dial)

    async def ready(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = await r.readline()
            ok = line.split(b" ")[1:2] == [b"/healthz/ready"]
            w.write(serialize_response(200 if ok else 404, [], b"ready\n" if ok else b"", False))
            await w.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            w.close()

    async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = streams.for_authority(args.authority or "")
        if s is None:
            body = f"service {args.authority} not found in config\n".encode()
            w.write(serialize_response(503, [("content-type", "text/plain")], body, False))
            await w.drain()
            w.close()
            return
        await s.serve(r, w)

    servers = [
        await asyncio.start_server(ready, *parse_addr("--readiness-addr", args.readiness_addr))
    ]
    if args.http_addr:
        servers.append(await asyncio.start_server(http, *parse_addr("--http-addr", args.http_addr)))
    names = ["readiness", "http"]
    for name, s in zip(names, servers, strict=False):
        print(
            f"waypoint {args.namespace}/{args.name}: {name} on {s.sockets[0].getsockname()[1]}",
            flush=True,
        )
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("readiness_addr", "hbone_addr", "metrics_addr"):
        try:
            parse_addr("--" + flag.replace("_", "-"), getattr(args, flag))
        except argparse.ArgumentTypeError as exc:
            print(f"waypoint: {exc}", file=sys.stderr)
            return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
