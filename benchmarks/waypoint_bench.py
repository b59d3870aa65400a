"""Waypoint HTTP/1.1 overhead: requests/s and p50/p99 through the waypoint vs direct, same run.

A child process runs a keep-alive echo backend and a waypoint in front of it (an 80/20 split
route between two backend names that resolve to the same server, so routing and weighted
choice are on the path); the repository's load generator measures the direct path and the
waypoint path back to back, and the ratio is what to read (the machine is noisy). Until the
HBONE core lands this is plain TCP on loopback, not ztunnel → waypoint → ztunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def _serve() -> None:
    from mesh.config.model import BackendRef, HTTPRoute, ParentRef, RouteRule
    from waypoint.http1 import Http1Stream
    from waypoint.routing import RouteTable

    body = b"hello from backend\n"
    resp = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                cl = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        cl = int(line.split(b":", 1)[1])
                if cl:
                    await r.readexactly(cl)
                w.write(resp)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    table = RouteTable(
        [
            HTTPRoute(
                "bench",
                "split",
                (ParentRef("Service", "echo", "bench", 80),),
                rules=(
                    RouteRule(
                        backend_refs=(
                            BackendRef("v1", "bench", 80, 80),
                            BackendRef("v2", "bench", 80, 20),
                        )
                    ),
                ),
            )
        ]
    )

    async def connect(ref: BackendRef | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", bport)

    stream = Http1Stream(lambda: table, connect)
    wp = await asyncio.start_server(stream.serve, "127.0.0.1", 0)
    print(json.dumps({"backend": bport, "waypoint": wp.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


def _loadgen(port: int, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            f"http://127.0.0.1:{port}/",
            "--rate",
            "0",
            "--duration",
            str(args.duration),
            "--connections",
            str(args.connections),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=8)
    args = p.parse_args(argv)
    if args.serve:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_serve())
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.waypoint_bench", "--serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ports = json.loads(child.stdout.readline())
        rows = [
            ("direct", _loadgen(ports["backend"], args)),
            ("waypoint", _loadgen(ports["waypoint"], args)),
        ]
    finally:
        child.terminate()
        child.wait(5)
    print(f"{'path':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in rows:
        pct = r.get("latency_ms", r)
        print(
            f"{name:<10}{r.get('achieved_rate', 0):>10.0f}{pct.get('p50', float('nan')):>10.2f}"
            f"{pct.get('p99', float('nan')):>10.2f}{r.get('errors', 0):>8}"
        )
    d, w = rows[0][1].get("achieved_rate", 0), rows[1][1].get("achieved_rate", 0)
    if d:
        print(f"waypoint/direct throughput ratio: {w / d:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
