"""HBONE tunnel versus a direct connection, in one run on loopback: figures and ratios.

Two processes, as two nodes would be: this one runs the client apps and the client side of the
tunnel (an outbound listener + the HBONE pool); a child runs the HBONE server and the
destination app. Measured: one bulk stream's throughput, and 1 KiB request/response rate over
16 connections. It prints figures; it never judges them.

    python -m benchmarks.tunnel_bench [--bulk-mib 256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from certs.ca import CertificateAuthority
from certs.spiffe import node_id
from mesh.hbone import ConnectRequest, HbonePool, serve
from mesh.tcp import TcpEndpoint, join
from mesh.tls import client_context, server_context

TD = "cluster.local"
CLIENT = "spiffe://cluster.local/ns/bench/sa/client"
CHUNK = 1 << 16


async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Destination app: 'B' = bulk sink answering the byte count; 'R' = 1 KiB echo loop."""
    mode = await reader.readexactly(1)
    if mode == b"B":
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(str(total).encode())
    else:
        while True:
            try:
                msg = await reader.readexactly(1024)
            except asyncio.IncompleteReadError:
                break
            writer.write(msg)
    await writer.drain()
    writer.close()


async def server_main(ca_dir: str) -> None:
    ca = CertificateAuthority.load(ca_dir)
    app_srv = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_srv.sockets[0].getsockname()[1]

    async def handler(req: ConnectRequest) -> None:
        host, _, port = req.authority.rpartition(":")
        _, ep = await asyncio.get_running_loop().create_connection(TcpEndpoint, host, int(port))
        join(req.accept(), ep)

    ctx = server_context(ca.issue(node_id(TD, "server")), ca.bundle_pem)
    hbone = await serve("127.0.0.1", 0, ctx, handler, trust_domain=TD)
    print(json.dumps({"app": app_port, "hbone": hbone.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


async def bulk(port: int, nbytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buf = b"x" * (1 << 20)
    t0 = time.perf_counter()
    writer.write(b"B")
    sent = 0
    while sent < nbytes:
        writer.write(buf)
        sent += len(buf)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read(-1)
    elapsed = time.perf_counter() - t0
    writer.close()
    assert int(answer) == nbytes, answer
    return nbytes / elapsed / (1 << 20)


async def rr(port: int, seconds: float, conns: int = 16) -> float:
    msg = os.urandom(1024)
    count = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"R")
        while time.perf_counter() < stop:
            writer.write(msg)
            await reader.readexactly(1024)
            count += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    return count / (time.perf_counter() - t0)


def start_server_node(ca_dir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.tunnel_bench", "--serve", str(ca_dir)],
        stdout=subprocess.PIPE,
        env=env,
    )


async def client_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca_dir = Path(tmp) / "ca"
        ca = CertificateAuthority.init(ca_dir)
        child = start_server_node(ca_dir)
        try:
            assert child.stdout is not None
            ports = json.loads(await asyncio.to_thread(child.stdout.readline))
            ctx = client_context(ca.issue(CLIENT), ca.bundle_pem)
            pool = HbonePool(lambda _: ctx, trust_domain=TD)
            loop = asyncio.get_running_loop()
            tasks: set[asyncio.Task[None]] = set()

            def outbound() -> TcpEndpoint:
                ep = TcpEndpoint()

                async def tunnel() -> None:
                    stream = await pool.connect(
                        CLIENT,
                        ("127.0.0.1", ports["hbone"]),
                        f"127.0.0.1:{ports['app']}",
                        expected_peers=frozenset({node_id(TD, "server")}),
                    )
                    join(ep, stream)

                t = loop.create_task(tunnel())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                return ep

            out = await loop.create_server(outbound, "127.0.0.1", 0)
            tunnel_port = out.sockets[0].getsockname()[1]
            nbytes = args.bulk_mib << 20
            rows = []
            for name, port in (("direct", ports["app"]), ("hbone", tunnel_port)):
                await bulk(port, 8 << 20)  # warm-up: pool, TLS, windows
                mib_s = await bulk(port, nbytes)
                rps = await rr(port, args.seconds)
                rows.append((name, mib_s, rps))
            out.close()
            pool.close()
        finally:
            child.terminate()
            child.wait(10)
    (_, d_bulk, d_rr), (_, t_bulk, t_rr) = rows
    print(f"{'path':8} {'bulk MiB/s':>11} {'1KiB req/s (16 conns)':>22}")
    for name, b, r in rows:
        print(f"{name:8} {b:11.1f} {r:22.0f}")
    print(f"{'ratio':8} {t_bulk / d_bulk:11.2f} {t_rr / d_rr:22.2f}   (hbone / direct)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bulk-mib", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(server_main(args.serve) if args.serve else client_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
