"""Cost of recording flows: mesh CPU per request with the flow ring on versus off
(`--flow-buffer-size 0`), same process, same backends, rounds interleaved.

A child process holds two identical meshes on loopback (ztunnel n1 → [waypoint →] ztunnel n2 →
backend), one recording flows into rings of 4096 (the default), one not. Two workloads:
- L7: keep-alive HTTP/1.1 through the waypoint (the repository's load generator): one flow per
  request at the waypoint;
- L4 churn: a new connection per request over the L4 path: two flows per request (n1's
  outbound, n2's inbound), the most flows per unit of proxy work ztunnel ever records.
The figure is the child's CPU (user + system) per request; read the on/off ratio, not the
absolute numbers (the machine is shared). Prints; never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.waypoint_bench import L4_VIP, WP_VIP, _cpu_seconds, _fixed, _loadgen, _manifest

ROOT = Path(__file__).resolve().parent.parent


async def _serve() -> None:
    from certs.ca import CertificateAuthority
    from mesh.config.parse import parse_objects
    from mesh.config.snapshot import Snapshot
    from mesh.flows import FlowRing
    from mesh.hbone import serve
    from mesh.identity.manager import Identities
    from mesh.metrics import MeshMetrics
    from waypoint.proxy import Waypoint
    from ztunnel.proxy import InboundHbone, Node, Outbound

    body = b"hello from backend\n"
    resp = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await r.readexactly(int(line.split(b":", 1)[1]))
                w.write(resp)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    loop = asyncio.get_running_loop()
    b1 = await asyncio.start_server(backend, "127.0.0.3", 0)
    bport = b1.sockets[0].getsockname()[1]
    b2 = await asyncio.start_server(backend, "127.0.0.4", bport)
    ports: dict[str, int] = {}
    rings: dict[str, list[FlowRing]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids = Identities(CertificateAuthority.init(Path(tmp) / "ca"))
        for variant, size in (("on", 4096), ("off", 0)):
            snap: list[Snapshot] = [Snapshot()]
            r = [FlowRing(size, node=n, proxy=n) for n in ("n1", "n2", "waypoint")]
            rings[variant] = r
            n2 = Node("n2", functools.partial(lambda s: s[0], snap), ids, MeshMetrics(),
                      flows=r[1] if size else None)  # fmt: skip
            h2srv = await serve("127.0.0.2", 0, ids.server_context(n2.identity),
                                InboundHbone(n2), trust_domain="cluster.local")  # fmt: skip
            h2port = h2srv.sockets[0].getsockname()[1]
            wp = Waypoint("bench", "waypoint", functools.partial(lambda s: s[0], snap), ids,
                          node_ports={"n2": h2port}, flows=r[2])  # fmt: skip
            await wp.listen("127.0.0.9", 0)
            snap[0] = parse_objects(_manifest(wp.port, bport))
            n1 = Node("n1", functools.partial(lambda s: s[0], snap), ids, MeshMetrics(),
                      hbone_port=h2port, flows=r[0] if size else None)  # fmt: skip
            for name, vip in (("l7", WP_VIP), ("l4", L4_VIP)):
                srv = await loop.create_server(
                    Outbound(n1, functools.partial(_fixed, (vip, 80))).protocol, "127.0.0.1", 0
                )
                ports[f"{name}-{variant}"] = srv.sockets[0].getsockname()[1]
        print(json.dumps(ports), flush=True)

        async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            counts = {v: [x.seq for x in rs] for v, rs in rings.items()}
            writer.write(json.dumps(counts).encode() + b"\n")
            await writer.drain()
            writer.close()

        stats = await asyncio.start_server(report, "127.0.0.1", 0)
        print(stats.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()
    b1.close()
    b2.close()


async def _churn(port: int, seconds: float, conns: int) -> dict[str, Any]:
    """New connection per request: connect, GET, read the answer, close."""
    req = b"GET / HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n"
    stop = time.monotonic() + seconds
    done = [0, 0]

    async def one() -> None:
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(req)
                await w.drain()
                data = await asyncio.wait_for(r.readuntil(b"hello from backend\n"), 10)
                done[0 if data.startswith(b"HTTP/1.1 200") else 1] += 1
                w.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                done[1] += 1

    await asyncio.gather(*(one() for _ in range(conns)))
    return {"statuses": {"200": done[0]}, "errors": done[1], "achieved_rate": done[0] / seconds}


def _stats(port: int) -> dict[str, list[int]]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = s.makefile().readline()
    out: dict[str, list[int]] = json.loads(data)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per sample")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
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
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.flows_bench", "--serve"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    cpu: dict[str, float] = {}
    reqs: dict[str, int] = {}
    try:
        assert child.stdout is not None
        ports = json.loads(child.stdout.readline())
        stats_port = int(child.stdout.readline())
        for rnd in range(args.rounds):
            order = ("on", "off") if rnd % 2 == 0 else ("off", "on")
            for kind in ("l7", "l4"):
                for variant in order:
                    key = f"{kind}-{variant}"
                    c0 = _cpu_seconds(child.pid)
                    if kind == "l7":
                        r = _loadgen(ports[key], args)
                    else:
                        r = asyncio.run(_churn(ports[key], args.duration, args.connections))
                    cpu[key] = cpu.get(key, 0.0) + _cpu_seconds(child.pid) - c0
                    reqs[key] = reqs.get(key, 0) + sum(r.get("statuses", {}).values())
        recorded = _stats(stats_port)
    finally:
        child.terminate()
        child.wait(5)
    print(f"{'workload':<34}{'requests':>10}{'CPU us/req':>12}")
    for kind, label in (("l7", "L7 keep-alive via waypoint"), ("l4", "L4 new connection/request")):
        for variant in ("on", "off"):
            key = f"{kind}-{variant}"
            n = max(1, reqs.get(key, 0))
            print(f"{label + ' flows ' + variant:<34}{reqs.get(key, 0):>10}"
                  f"{cpu[key] / n * 1e6:>12.1f}")  # fmt: skip
        on = cpu[f"{kind}-on"] / max(1, reqs[f"{kind}-on"])
        off = cpu[f"{kind}-off"] / max(1, reqs[f"{kind}-off"])
        print(f"  {kind}: CPU per request, recording on/off: {on / off:.3f} "
              f"({(on / off - 1) * 100:+.1f}%)")  # fmt: skip
    print(f"flows recorded (n1, n2, waypoint): on {recorded['on']}, off {recorded['off']}")
    hot = _hot_path_us()
    l7 = cpu["l7-off"] / max(1, reqs["l7-off"]) * 1e6
    l4 = cpu["l4-off"] / max(1, reqs["l4-off"]) * 1e6
    print(
        f"hot path per flow (record_lazy, this process): {hot:.2f} us; as a share of the "
        f"CPU per request above: L7 {hot / l7:.2%}, L4 {2 * hot / l4:.2%} (two flows)"
    )
    return 0


def _hot_path_us(n: int = 200_000) -> float:
    """What a proxy pays per flow when recording is on: two clock reads, a tuple, an append
    (the Flow itself is built only when read). Less the same loop with recording off."""
    from mesh.flows import Flow, FlowRing

    def build(*_a: object) -> Flow:
        return Flow(time=0.0)

    def run(ring: FlowRing | None) -> float:
        now, mono = time.time, time.monotonic
        t0 = time.perf_counter()
        if ring is None:  # recording off: the hooks test `flows is not None` and stop
            for _ in range(n):
                if ring is not None:
                    pass
        else:
            for _ in range(n):
                if ring is not None:
                    ring.record_lazy(build, "FORWARDED", None, 1, 2, now(), mono())
        return time.perf_counter() - t0

    best = min(run(FlowRing(4096)) - run(None) for _ in range(5))
    return max(0.0, best) / n * 1e6


if __name__ == "__main__":
    sys.exit(main())
