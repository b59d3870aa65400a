"""`python -m benchmarks.tls_layer`: server-side CPU of the two TLS layers a uvloop process
can use, in the same run, interleaved: uvloop's own (`loop.create_server(ssl=...)`) and
asyncio's protocol on the uvloop loop (`mesh.tls.start_tls_server`, what HBONE uses since
uvloop's was found to keep memory of every closed connection). Each round starts a fresh
echo server process of each kind and drives one mTLS connection through it: bulk (MiB both
ways) and 1 KiB request/response. Prints the CPU seconds each server used and the ratio per
round. A benchmark: it prints figures and judges nothing. Loopback only."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import uvloop

from certs.ca import CertificateAuthority
from mesh.tls import client_context, server_context, start_tls_server

ROOT = Path(__file__).resolve().parents[1]
MODES = ("uvloop", "asyncio")


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _serve(mode: str, ca_dir: Path, port_file: Path) -> None:
    ca = CertificateAuthority.load(ca_dir)
    ctx = server_context(ca.issue("spiffe://cluster.local/ns/bench/sa/server"), ca.bundle_pem)
    loop = asyncio.get_running_loop()
    if mode == "uvloop":
        srv = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=ctx)
    else:
        srv = await start_tls_server(_Echo, ctx, host="127.0.0.1")
    port = srv.sockets[0].getsockname()[1]
    await asyncio.to_thread(port_file.write_text, str(port))
    await asyncio.sleep(3600)


async def _drive(port: int, ca: CertificateAuthority, mib: int, requests: int) -> None:
    ctx = client_context(ca.issue("spiffe://cluster.local/ns/bench/sa/client"), ca.bundle_pem)
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="bench")
    total, chunk = mib * 1024 * 1024, b"x" * 65536

    async def read_all() -> None:
        got = 0
        while got < total:
            got += len(await r.read(1 << 20))

    reader = asyncio.create_task(read_all())
    for _ in range(total // len(chunk)):
        w.write(chunk)
        await w.drain()
    await reader
    msg = b"y" * 1024
    for _ in range(requests):
        w.write(msg)
        await w.drain()
        got = 0
        while got < len(msg):
            got += len(await r.read(65536))
    w.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tls_layer", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mib", type=int, default=256, help="bulk MiB each way per round")
    p.add_argument("--requests", type=int, default=2000, help="1 KiB exchanges per round")
    p.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)  # MODE CA_DIR PORT_FILE
    a = p.parse_args(argv)
    uvloop.install()
    if a.serve:
        asyncio.run(_serve(a.serve[0], Path(a.serve[1]), Path(a.serve[2])))
        return 0
    with tempfile.TemporaryDirectory(prefix="tls-layer-") as tmp:
        ca_dir = Path(tmp) / "ca"
        ca = CertificateAuthority.init(ca_dir)
        used: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for mode in MODES:
                port_file = Path(tmp) / f"port-{mode}"
                port_file.unlink(missing_ok=True)
                srv = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.tls_layer", "--serve", mode,
                     str(ca_dir), str(port_file)],
                    env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                )  # fmt: skip
                try:
                    while not (port_file.exists() and port_file.read_text()):
                        if srv.poll() is not None:
                            raise SystemExit(f"{mode} server exited ({srv.returncode})")
                        time.sleep(0.05)
                    before = _cpu_seconds(srv.pid)
                    asyncio.run(_drive(int(port_file.read_text()), ca, a.mib, a.requests))
                    used[mode].append(_cpu_seconds(srv.pid) - before)
                finally:
                    srv.terminate()
                    srv.wait(10)
    ratios = [x / u for x, u in zip(used["asyncio"], used["uvloop"], strict=True)]
    print(f"server CPU seconds per round ({a.mib} MiB each way + {a.requests} x 1 KiB):")
    for mode in MODES:
        print(f"  {mode:8} " + "  ".join(f"{x:.2f}" for x in used[mode]))
    print("  asyncio/uvloop per round: " + "  ".join(f"{r:.2f}x" for r in ratios)
          + f"  (median {statistics.median(ratios):.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
