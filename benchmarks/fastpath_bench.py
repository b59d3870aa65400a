"""ztunnel's same-node splice, userspace (`--fastpath off`) against the sockmap fast path
(`on`), in one run with interleaved repeats; prints bulk MiB/s, request latency p50/p99 at a
fixed rate, the relay's CPU per request, and the ratios. Root only. Not a test: no thresholds.

With `--hbone`, a third relay joins the rotation: what a meshed same-node connection cost
before local delivery (`--local-delivery off`): ztunnel's outbound HBONE client (pool, mTLS,
h2 CONNECT) to its own inbound HBONE server in the same process, which dials the server. The
other two are then what local delivery costs in user space and with the sockmap (local
delivery's policy decisions are per connection, made once before this splice).

The relay is ztunnel's own code (TcpEndpoint, `node.splice` or `FastPath.splice`, uvloop as
ztunnel runs it) in its own process, between a client and a server process on loopback: the
two legs ztunnel has for two pods on one node, without the lab around them (policy and the
dial are the same on both paths and not what is compared). The kernel's redirect runs partly
in softirq and kworker context, which the relay's CPU figure does not see: the wall-clock
figures are the comparison; CPU is printed for what it shows (user space saved).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.procstat import CLK_TCK, cpu_ticks

if TYPE_CHECKING:
    from mesh.stream import Endpoint
    from mesh.telemetry import Accounting

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
REQ = 64  # request and response size for the latency runs


def relay(mode: str, pins: str, upstream: int) -> None:
    """The relay process: accept on an ephemeral loopback port, dial `upstream`, splice."""
    import uvloop

    from bpf.fastpath import FastPathMaps
    from mesh.metrics import ConnectionLabels, MeshMetrics
    from mesh.tcp import TcpEndpoint
    from mesh.telemetry import Accounting
    from ztunnel.proxy.fastpath import FastPath
    from ztunnel.proxy.node import splice

    async def run() -> None:
        loop = asyncio.get_running_loop()
        fast = FastPath(FastPathMaps.open_pinned(pins)) if mode == "on" else None
        metrics = MeshMetrics()
        tasks: set[asyncio.Task[None]] = set()

        def acct() -> Accounting:
            return Accounting(
                metrics, ConnectionLabels.build(reporter="source"), reporter="source",
                src="127.0.0.1", dst=f"127.0.0.1:{upstream}", src_identity=None,
                dst_identity=None, service=None, mtls=False,
            )  # fmt: skip

        dial = await _hbone_to_self(upstream, acct) if mode == "hbone" else None

        async def serve(down: TcpEndpoint) -> None:
            if dial is not None:
                await splice(down, await dial(), acct())
                return
            _, up = await loop.create_connection(TcpEndpoint, "127.0.0.1", upstream)
            await (fast.splice if fast is not None else splice)(down, up, acct())

        def made(ep: TcpEndpoint) -> None:
            t = loop.create_task(serve(ep))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        srv = await loop.create_server(lambda: TcpEndpoint(on_made=made), "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
        if fast is not None:
            print(f"engaged={fast.engaged} fallbacks={fast.fallbacks}", file=sys.stderr)

    uvloop.run(run())


async def _hbone_to_self(
    upstream: int, acct: Callable[[], Accounting]
) -> Callable[[], Awaitable[Endpoint]]:
    """ztunnel's HBONE path on one node: an inbound HBONE listener (mTLS, h2) that dials
    `upstream`, and a dialer that opens a CONNECT to it through ztunnel's pool, as the
    outbound side does with `--local-delivery off`."""
    import atexit
    import shutil
    import tempfile

    from certs.ca import CertificateAuthority
    from mesh.hbone import ConnectRequest, serve
    from mesh.hbone.pool import HbonePool
    from mesh.identity.manager import Identities
    from mesh.identity.spiffe import node_id
    from mesh.tcp import TcpEndpoint
    from ztunnel.proxy.node import splice

    loop = asyncio.get_running_loop()
    td = "cluster.local"
    ca_dir = tempfile.mkdtemp(prefix="fpbench-ca-")
    atexit.register(shutil.rmtree, ca_dir, True)  # the relay's own, gone when it exits
    ids = Identities(CertificateAuthority.init(Path(ca_dir)))
    me, src = node_id(td, "n1"), f"spiffe://{td}/ns/bench/sa/client"
    await ids.ensure(me)
    await ids.ensure(src)

    async def inbound(req: ConnectRequest) -> None:
        _, app = await loop.create_connection(TcpEndpoint, "127.0.0.1", upstream)
        await splice(req.accept(), app, acct())

    srv = await serve("127.0.0.1", 0, ids.listener_context(me), inbound, trust_domain=td)
    port = srv.sockets[0].getsockname()[1]
    pool = HbonePool(ids.client_context_async, trust_domain=td)

    async def dial() -> Endpoint:
        return await pool.connect(src, ("127.0.0.1", port), f"127.0.0.1:{upstream}",
                                  expected_peers=frozenset({me}))  # fmt: skip

    return dial


def server() -> None:
    """Bulk: count to EOF and answer the count. Latency: echo fixed-size requests."""
    import threading

    ls = socket.create_server(("127.0.0.1", 0))
    print(ls.getsockname()[1], flush=True)

    def handle(c: socket.socket) -> None:
        kind = c.recv(1)
        if kind == b"B":
            buf, n = bytearray(1 << 20), 0
            while k := c.recv_into(buf):
                n += k
            c.sendall(str(n).encode())
        else:
            while True:
                data = b""
                while len(data) < REQ:
                    chunk = c.recv(REQ - len(data))
                    if not chunk:
                        c.close()
                        return
                    data += chunk
                c.sendall(data)
        c.close()

    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def _cpu(pid: int) -> float:
    return cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / CLK_TCK


def _host_busy() -> float:
    """Busy CPU seconds of the whole host (/proc/stat: all but idle and iowait): what the
    kernel's redirect costs in softirq and kworkers too, and the client's and server's (the
    same in both modes). Other work on the host is noise in it."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / CLK_TCK


def bulk(port: int, mib: int) -> float:
    s = socket.create_connection(("127.0.0.1", port))
    blob = os.urandom(1 << 20)
    t = time.perf_counter()
    s.sendall(b"B")
    for _ in range(mib):
        s.sendall(blob)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64))
    secs = time.perf_counter() - t
    s.close()
    assert got == mib << 20, f"server counted {got}, sent {mib << 20}"
    return mib / secs


def latency(port: int, rate: int, n: int) -> list[float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"L")
    req = os.urandom(REQ)
    out: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t = time.perf_counter()
        s.sendall(req)
        got = b""
        while len(got) < REQ:
            got += s.recv(REQ - len(got))
        out.append(time.perf_counter() - t)
        assert got == req
    s.close()
    return out


def one(mode: str, pins: str, up: int, mib: int, rate: int, n: int) -> dict[str, float]:
    p = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fastpath_bench", "relay", mode, pins, str(up)],
        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        c0, h0 = _cpu(p.pid), _host_busy()
        mibs = bulk(port, mib)
        c1, h1 = _cpu(p.pid), _host_busy()
        lat = sorted(latency(port, rate, n))
        c2, h2 = _cpu(p.pid), _host_busy()
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=30)
    return {
        "mibs": mibs, "bulk_cpu_s_per_gib": (c1 - c0) / (mib / 1024),
        "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "cpu_us_per_req": (c2 - c1) / n * 1e6,
        "host_cpu_s_per_gib": (h1 - h0) / (mib / 1024), "host_cpu_us_per_req": (h2 - h1) / n * 1e6,
    }  # fmt: skip


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="python -m benchmarks.fastpath_bench")
    a.add_argument("--mib", type=int, default=256, help="bulk transfer size per run")
    a.add_argument("--rate", type=int, default=500, help="requests per second (latency)")
    a.add_argument("--requests", type=int, default=2000)
    a.add_argument("--repeats", type=int, default=3, help="off/on pairs, interleaved")
    a.add_argument(
        "--hbone", action="store_true",
        help="also HBONE from the relay to itself (meshed same node before local delivery)",
    )  # fmt: skip
    args = a.parse_args(argv)
    if os.geteuid() != 0:
        print("fastpath_bench: needs root (BPF)", file=sys.stderr)
        return 2
    pins = f"/sys/fs/bpf/ambientmesh-bench-{secrets.token_hex(2)}"
    load = [sys.executable, "-m", "bpf.fastpath", "load", "--pin-root", pins]
    subprocess.run(load, env=ENV, check=True, timeout=300)
    srv = subprocess.Popen([sys.executable, "-m", "benchmarks.fastpath_bench", "server"],
                           env=ENV, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert srv.stdout is not None
        up = int(srv.stdout.readline())
        order = ("hbone", "off", "on") if args.hbone else ("off", "on")
        res: dict[str, list[dict[str, float]]] = {m: [] for m in order}
        for _ in range(args.repeats):
            for mode in order:
                res[mode].append(one(mode, pins, up, args.mib, args.rate, args.requests))
    finally:
        srv.kill()  # our own child, by its PID
        srv.wait()
        subprocess.run([sys.executable, "-m", "bpf.fastpath", "unload", "--pin-root", pins],
                       env=ENV, check=False)  # fmt: skip
        if os.path.isdir(pins):
            os.rmdir(pins)
    hb = args.hbone
    head = f"{'':22}" + (f"{'hbone':>12}" if hb else "") + f"{'userspace':>12}{'fastpath':>12}"
    print(head + f"{'on/off':>8}" + (f"{'off/hb':>8}{'on/hb':>8}" if hb else ""))
    for key, label in (("mibs", "bulk MiB/s"), ("bulk_cpu_s_per_gib", "relay CPU s/GiB"),
                       ("p50_us", f"p50 us @{args.rate}/s"), ("p99_us", "p99 us"),
                       ("cpu_us_per_req", "relay CPU us/req"),
                       ("host_cpu_s_per_gib", "host CPU s/GiB"),
                       ("host_cpu_us_per_req", "host CPU us/req")):  # fmt: skip
        med = {m: statistics.median(r[key] for r in res[m]) for m in order}
        off, on = med["off"], med["on"]
        line = f"{label:22}" + (f"{med['hbone']:12.1f}" if hb else "")
        line += f"{off:12.1f}{on:12.1f}{_div(on, off):8.2f}"
        if hb:
            line += f"{_div(off, med['hbone']):8.2f}{_div(on, med['hbone']):8.2f}"
        print(line)
    print(f"(medians of {args.repeats} interleaved runs; {args.mib} MiB bulk, "
          f"{args.requests} x {REQ} B requests)")  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "server":
        server()
    else:
        raise SystemExit(main())
