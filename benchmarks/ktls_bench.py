"""kTLS versus user-space TLS, in one run: CPU seconds per GiB moved and single-stream
throughput, on raw sockets and through a ztunnel pair (HBONE), with plaintext as the baseline.

Runs where the kernel has kTLS (scripts/ktls-guest.sh --bench runs it inside the guest kernel
right after the kTLS tests); elsewhere it says why and exits 0. Both ends live in this
process, so CPU is the whole cost of moving the bytes: sender, receiver and (for the mesh
rows) both ztunnels, user and system time. It prints figures and ratios; it judges nothing.

    python -m benchmarks.ktls_bench [--mib 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from certs.ca import CertificateAuthority
from mesh import ktls
from mesh import tls as mtls
from mesh.config.parse import parse_objects
from mesh.hbone import serve
from mesh.identity.manager import Identities
from mesh.metrics import MeshMetrics
from ztunnel.proxy import InboundHbone, Node, Outbound

CHUNK = 256 * 1024
SERVER = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT = "spiffe://cluster.local/ns/bench/sa/client"
VIP = "10.96.0.10"


@dataclass
class Figure:
    path: str  # "raw" or "ztunnel pair"
    mode: str
    mib: int
    seconds: float
    cpu_seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.mib / self.seconds

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_seconds / (self.mib / 1024)


class Sink(asyncio.Protocol):
    """Counts bytes and resolves `done` at `target`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.n = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.n += len(data)
        if self.n >= self.target and not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool:
        return False


class Source(asyncio.Protocol):
    """Writes `total` bytes as fast as the transport's back-pressure allows."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.block = os.urandom(CHUNK)
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    async def run(self) -> None:
        assert self.transport is not None
        sent = 0
        while sent < self.total:
            await self.can_write.wait()
            self.transport.write(self.block)
            sent += len(self.block)


async def measure(path: str, mode: str, mib: int, run: Callable[[], Awaitable[None]]) -> Figure:
    t0, c0 = time.perf_counter(), os.times()
    await run()
    t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return Figure(path, mode, mib, t1 - t0, cpu)


# -- raw sockets -----------------------------------------------------------------------------


async def raw_stream(mode: str, ca: CertificateAuthority, mib: int, suite: str) -> Figure:
    loop = asyncio.get_running_loop()
    total = mib << 20
    sink = Sink(total)
    server: Any
    if mode == "plaintext":
        server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
    elif mode == "user-space TLS":
        sctx = mtls.server_context(ca.issue(SERVER), ca.bundle_pem)
        server = await loop.create_server(lambda: sink, "127.0.0.1", 0, ssl=sctx)
    else:
        kctx = ktls.server_context(ca.issue(SERVER), ca.bundle_pem, ciphers=[suite])
        server = await ktls.start_server(lambda: sink, "127.0.0.1", 0, kctx)
    addr = server.sockets[0].getsockname()[:2]
    src = Source(total)
    if mode == "plaintext":
        transport, _ = await loop.create_connection(lambda: src, *addr)
    elif mode == "user-space TLS":
        cctx = mtls.client_context(ca.issue(CLIENT), ca.bundle_pem)
        transport, _ = await loop.create_connection(
            lambda: src, *addr, ssl=cctx, server_hostname="bench"
        )
        cipher = transport.get_extra_info("cipher")[0]
        assert cipher == suite, f"stdlib negotiated {cipher}, comparing against {suite}"
    else:
        cctx2 = ktls.client_context(ca.issue(CLIENT), ca.bundle_pem, ciphers=[suite])
        transport, _ = await ktls.create_connection(lambda: src, addr, cctx2)
        assert transport.get_extra_info("ktls") is True

    async def go() -> None:
        await src.run()
        await sink.done

    try:
        return await measure("raw", mode, mib, go)
    finally:
        transport.close()
        server.close()


# -- through a ztunnel pair ------------------------------------------------------------------


def manifest(sink_port: int) -> list[dict[str, Any]]:
    amb = {"istio.io/dataplane-mode": "ambient"}
    return [
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
        {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}},
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "bench", "labels": amb}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "client", "namespace": "bench", "labels": {"app": "client"}},
         "spec": {"nodeName": "n1", "serviceAccountName": "client"},
         "status": {"podIP": "127.0.0.1"}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "sink", "namespace": "bench", "labels": {"app": "sink"}},
         "spec": {"nodeName": "n2", "serviceAccountName": "sink"},
         "status": {"podIP": "127.0.0.3"}},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "sink", "namespace": "bench"},
         "spec": {"clusterIP": VIP, "selector": {"app": "sink"},
                  "ports": [{"port": 80, "targetPort": sink_port}]}},
    ]  # fmt: skip


async def mesh_stream(mode: str, ca: CertificateAuthority, mib: int) -> Figure:
    loop = asyncio.get_running_loop()
    total = mib << 20
    sink = Sink(total)
    sink_srv = await loop.create_server(lambda: sink, "127.0.0.3", 0)
    if mode == "direct (no mesh)":
        src = Source(total)
        transport, _ = await loop.create_connection(lambda: src, *sink_srv.sockets[0].getsockname())

        async def direct() -> None:
            await src.run()
            await sink.done

        try:
            return await measure("ztunnel pair", mode, mib, direct)
        finally:
            transport.close()
            sink_srv.close()
    snap = parse_objects(manifest(sink_srv.sockets[0].getsockname()[1]))
    ids = Identities(ca, ktls=mode == "kTLS")
    n2 = Node("n2", lambda: snap, ids, MeshMetrics())
    hbone = await serve(
        "127.0.0.2", 0, ids.listener_context(n2.identity), InboundHbone(n2),
        trust_domain="cluster.local",
    )  # fmt: skip
    n1 = Node("n1", lambda: snap, ids, MeshMetrics(), hbone_port=hbone.sockets[0].getsockname()[1])
    out = await loop.create_server(Outbound(n1, lambda _s: (VIP, 80)).protocol, "127.0.0.1", 0)
    src = Source(total)
    transport, _ = await loop.create_connection(lambda: src, *out.sockets[0].getsockname()[:2])

    async def through() -> None:
        await src.run()
        await sink.done

    try:
        fig = await measure("ztunnel pair", mode, mib, through)
        conns = [c for cs in n1.pool._conns.values() for c in cs]
        assert conns and conns[0].transport is not None
        offloaded = conns[0].transport.get_extra_info("ktls") is True
        assert offloaded == (mode == "kTLS"), f"{mode}: HBONE connection offloaded={offloaded}"
        return fig
    finally:
        transport.close()
        out.close()
        hbone.close()
        sink_srv.close()
        n1.pool.close()
        for t in (*n1.tasks, *n2.tasks):
            t.cancel()


# -- report ----------------------------------------------------------------------------------


def table(figs: list[Figure]) -> str:
    lines = [f"{'path':<13} {'mode':<24} {'MiB':>5} {'MiB/s':>9} {'CPU s/GiB':>10}"]
    for f in figs:
        lines.append(
            f"{f.path:<13} {f.mode:<24} {f.mib:>5} {f.mib_per_s:>9.1f} {f.cpu_s_per_gib:>10.2f}"
        )
    return "\n".join(lines)


def ratios(figs: list[Figure], path: str, base: str, other: str) -> dict[str, float]:
    a = next(f for f in figs if f.path == path and f.mode == base)
    b = next(f for f in figs if f.path == path and f.mode == other)
    return {
        "throughput": b.mib_per_s / a.mib_per_s,
        "cpu_per_gib": b.cpu_s_per_gib / a.cpu_s_per_gib,
    }


async def amain(args: argparse.Namespace) -> dict[str, Any] | None:
    support = ktls.probe()
    if not support.available:
        print(f"ktls_bench: kernel {support.kernel} has no kTLS ({support.reason}); nothing to do")
        return None
    suite = "TLS_AES_256_GCM_SHA384"  # what the stdlib (user-space) side negotiates
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca")
        figs: list[Figure] = []
        for mode in ("plaintext", "user-space TLS", "kTLS"):
            figs.append(await raw_stream(mode, ca, args.mib, suite))
        for mode in ("direct (no mesh)", "user-space TLS", "kTLS"):
            figs.append(await mesh_stream(mode, ca, args.mib))
    print(f"kTLS benchmark: kernel {support.kernel}, {suite}, one stream, both ends in-process")
    print(table(figs))
    result: dict[str, Any] = {"kernel": support.kernel, "cipher": suite, "figures": []}
    for path in ("raw", "ztunnel pair"):
        r = ratios(figs, path, "user-space TLS", "kTLS")
        result[f"{path} kTLS/user-space"] = r
        print(
            f"{path}: kTLS vs user-space TLS: throughput x{r['throughput']:.2f}, "
            f"CPU per GiB x{r['cpu_per_gib']:.2f}"
        )
    result["figures"] = [
        {**asdict(f), "mib_per_s": f.mib_per_s, "cpu_s_per_gib": f.cpu_s_per_gib} for f in figs
    ]
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="MiB per stream (default 64)")
    p.add_argument("--json", help="also write the figures here")
    return p


def main() -> int:
    args = build_parser().parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(amain(args))
    if result is not None and args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
