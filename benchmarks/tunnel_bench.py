"""HBONE tunnel versus a direct connection, in one run: figures, CPU cost and ratios.

Every part is its own process, so the figure is the proxy's and not the load generator's:
the echo server, the load generators, and two real ztunnels (`python -m ztunnel`, the
production entry point) for node n1 (client side, outbound :15001) and node n2 (HBONE
:15008, delivering to the echo pod). They run in a network namespace made for the run, where a
netfilter REDIRECT sends connections to the service VIP to n1's :15001, exactly as a node
without BPF capture would; `direct` connects to the echo pod's address instead.

Measured per mode, in rounds interleaved (direct, tunnel, direct, tunnel, ...) because the
machine is shared and noisy; medians are reported:
- bulk: one stream, `--bulk-mib` MiB or `--bulk-seconds` s, whichever ends first (MiB/s);
- rr: 1 KiB request/response over `--conns` connections, one request in flight each, for
  `--seconds` s (req/s, p50/p99 latency);
- the CPU seconds each ztunnel process used (utime + stime from /proc) per GiB and per 1,000
  requests.
- http (`--loads http`): HTTP/1.1 keep-alive 0 B requests from `benchmarks.loadgen` (open
  loop) at each of `--http-rates` (0 = max, closed loop): ztunnel CPU µs per request, the
  figure of issue #15's "ztunnel per request"; `--strace DIR` adds, after the measured rounds,
  one traced load per rate with each ztunnel's `strace -c -f` (syscalls per request).
Ratios against `direct` in the same run are printed; nothing is judged.

`--base DIR` adds a second ztunnel pair running the code found in DIR (e.g. an earlier commit
exported with `git archive`), measured interleaved with the first: before/after in one run.

    python -m benchmarks.tunnel_bench [--rounds 3] [--bulk-mib 1024] [--seconds 5]
    python -m benchmarks.tunnel_bench --base /tmp/before   # before/after
    python -m benchmarks.tunnel_bench --profile /tmp/prof  # py-spy stacks of each ztunnel
    python -m benchmarks.tunnel_bench --base /tmp/before --loads http --rounds 10 \
        --http-seconds 3                                    # CPU per request, before/after

Needs root (network namespace, netfilter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
ECHO_IP = "127.0.0.3"
ECHO_PORT = 8080
N1_IP, N2_IP = "127.0.0.1", "127.0.0.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MSG = 1024


# -- the echo server (its own process) ----------------------------------------------------


HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class EchoProtocol(asyncio.Protocol):
    """First byte picks the mode: b'B' = bulk sink that answers the byte count at EOF,
    b'R' = echo everything back, b'G' = an HTTP/1.1 keep-alive server answering every
    bodiless request with an empty 200 (the per-request load, as loadgen sends it)."""

    def __init__(self) -> None:
        self.mode = 0
        self.total = 0
        self.head = b""  # HTTP: the start of a request whose end has not arrived
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode = data[0]
            if self.mode != ord("G"):
                data = data[1:]
        if self.mode == ord("B"):
            self.total += len(data)
        elif self.mode == ord("G"):
            buf = self.head + data
            n = buf.count(b"\r\n\r\n")
            if n:
                self.transport.write(HTTP_OK * n)
                buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
            self.head = buf
        elif data:
            self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == ord("B"):
            self.transport.write(str(self.total).encode())
        self.transport.close()
        return True


async def echo_main() -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(EchoProtocol, ECHO_IP, ECHO_PORT, reuse_address=True, backlog=256)
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the load generators (their own processes) --------------------------------------------


async def bulk_main(host: str, port: int, nbytes: int, seconds: float) -> dict[str, Any]:
    """One stream: send until `nbytes` or `seconds`, half-close, wait for the sink's count."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.transport.set_write_buffer_limits(4 << 20)
    buf = b"x" * (1 << 20)
    t0 = time.perf_counter()
    stop = t0 + seconds
    writer.write(b"B")
    sent = 0
    while sent < nbytes and time.perf_counter() < stop:
        writer.write(buf)
        sent += len(buf)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read(-1)
    elapsed = time.perf_counter() - t0
    writer.close()
    if not answer or int(answer) != sent:
        raise SystemExit(f"bulk: sent {sent} bytes, the sink counted {answer!r}")
    return {"bytes": sent, "seconds": elapsed}


class RrClient(asyncio.Protocol):
    """One connection, one 1 KiB request in flight; latency from send to full answer."""

    def __init__(self, msg: bytes, stop: float, lat: list[int], done: asyncio.Future[None]):
        self.msg = msg
        self.stop = stop
        self.lat = lat
        self.done = done
        self.got = 0
        self.t = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.t = time.perf_counter_ns()
        self.transport.write(b"R" + self.msg)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.got += len(data)
        if self.got < MSG:
            return
        if self.got > MSG:
            self.transport.abort()
            self.done.set_exception(RuntimeError(f"echo answered {self.got} bytes, not {MSG}"))
            return
        now = time.perf_counter_ns()
        self.lat.append(now - self.t)
        self.got = 0
        if time.perf_counter() >= self.stop:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.t = now
        self.transport.write(self.msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"connection lost: {exc}"))


async def rr_main(host: str, port: int, seconds: float, conns: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    msg = os.urandom(MSG)
    lat: list[int] = []
    t0 = time.perf_counter()
    stop = t0 + seconds
    futs: list[asyncio.Future[None]] = []
    for _ in range(conns):
        fut: asyncio.Future[None] = loop.create_future()
        futs.append(fut)
        await loop.create_connection(
            lambda f=fut: RrClient(msg, stop, lat, f),  # type: ignore[misc]
            host,
            port,
        )
    await asyncio.gather(*futs)
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "seconds": elapsed,
        "p50_ms": lat[len(lat) // 2] / 1e6,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6,
    }


# -- the orchestrator (inside the namespace) ----------------------------------------------


def manifest(pairs: int) -> str:
    amb = "{istio.io/dataplane-mode: ambient}"
    docs = [
        f"kind: Node\napiVersion: v1\nmetadata: {{name: n1}}\n"
        f"status: {{addresses: [{{type: InternalIP, address: {N1_IP}}}]}}",
        f"kind: Node\napiVersion: v1\nmetadata: {{name: n2}}\n"
        f"status: {{addresses: [{{type: InternalIP, address: {N2_IP}}}]}}",
        f"kind: Namespace\napiVersion: v1\nmetadata: {{name: bench, labels: {amb}}}",
        "kind: Pod\napiVersion: v1\nmetadata: {name: client, namespace: bench}\n"
        f"spec: {{nodeName: n1, serviceAccountName: client}}\nstatus: {{podIP: {N1_IP}}}",
        "kind: Pod\napiVersion: v1\n"
        "metadata: {name: echo, namespace: bench, labels: {app: echo}}\n"
        f"spec: {{nodeName: n2, serviceAccountName: echo}}\nstatus: {{podIP: {ECHO_IP}}}",
    ]
    for i in range(pairs):
        docs.append(
            f"kind: Service\napiVersion: v1\nmetadata: {{name: echo{i}, namespace: bench}}\n"
            f"spec: {{clusterIP: {vip(i)}, selector: {{app: echo}}, "
            f"ports: [{{port: 80, targetPort: {ECHO_PORT}}}]}}"
        )
    return "\n---\n".join(docs) + "\n"


def vip(i: int) -> str:
    return f"10.96.0.{10 + i}"


def outbound_port(i: int) -> int:
    return 15001 + 100 * i


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


@dataclass
class Mode:
    name: str
    host: str
    port: int
    pids: tuple[int, ...] = ()
    bulk: list[dict[str, Any]] = field(default_factory=list)
    rr: list[dict[str, Any]] = field(default_factory=list)
    http: dict[float, list[dict[str, Any]]] = field(default_factory=dict)


def spawn(args: list[str], pythonpath: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.PIPE, text=True, cwd=pythonpath
    )


def wait_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{what} exited ({proc.wait()}) before it was ready")
    return line


def load_command(mode: Mode, kind: str, a: argparse.Namespace, rate: float) -> list[str]:
    if kind == "http":
        # loadgen's open loop: request i is due at t0 + i/rate whatever happened before
        return [sys.executable, "-m", "benchmarks.loadgen", f"http://{mode.host}:{mode.port}/",
                "--rate", f"{rate:g}", "--duration", str(a.http_seconds),
                "--connections", str(a.http_conns)]  # fmt: skip
    extra = (
        ["--bulk-mib", str(a.bulk_mib), "--bulk-seconds", str(a.bulk_seconds)]
        if kind == "bulk"
        else ["--seconds", str(a.seconds), "--conns", str(a.conns)]
    )
    return [sys.executable, "-m", "benchmarks.tunnel_bench", "--role", kind,
            "--target", f"{mode.host}:{mode.port}", *extra]  # fmt: skip


def run_load(
    mode: Mode, kind: str, a: argparse.Namespace, rate: float = 0.0, strace: Path | None = None
) -> dict[str, Any]:
    """One load against one mode; the CPU each ztunnel used meanwhile. `strace`: count the
    ztunnels' syscalls (strace -c -f) into that directory instead (its CPU is then not the
    proxy's own: such a run is never one of the measured rounds)."""
    tracers: list[subprocess.Popen[bytes]] = []
    if strace is not None:
        for node, pid in zip(("n1", "n2"), mode.pids, strict=True):
            out_file = strace / f"{mode.name}-{node}-{kind}-{rate:g}.txt"
            tracers.append(subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(pid), "-o", str(out_file)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        time.sleep(1.0)  # attached to every thread before the load starts
    before = [cpu_seconds(p) for p in mode.pids]
    try:
        out = subprocess.run(
            load_command(mode, kind, a, rate),
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        for t in tracers:  # strace writes its summary when it detaches on SIGINT
            t.send_signal(signal.SIGINT)
            t.wait(30)
    if out.returncode != 0:
        raise SystemExit(f"{kind} load on {mode.name} failed: {out.stderr.strip()}")
    res: dict[str, Any] = json.loads(out.stdout)
    res["cpu"] = [cpu_seconds(p) - b for p, b in zip(mode.pids, before, strict=True)]
    if kind == "http":
        if res["errors"]:
            raise SystemExit(f"http load on {mode.name}: {res['errors']} errors")
        res["requests"] = res["completed"]
        res["seconds"] = res["duration_s"]
    return res


def inside_main(a: argparse.Namespace) -> None:
    trees = [("hbone", ROOT)] + ([("base", Path(a.base).resolve())] if a.base else [])
    procs: list[subprocess.Popen[str]] = []
    spies: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ca = Path(tmp) / "ca"
            subprocess.run(
                [sys.executable, "-m", "meshctl.cli", "ca", "init", str(ca)],
                env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True,
            )  # fmt: skip
            cfg = Path(tmp) / "mesh.yaml"
            cfg.write_text(manifest(len(trees)))
            echo = spawn(["-m", "benchmarks.tunnel_bench", "--role", "echo"], ROOT)
            procs.append(echo)
            wait_line(echo, "echo server")
            modes = [Mode("direct", ECHO_IP, ECHO_PORT)]
            for i, (name, tree) in enumerate(trees):
                hbone = 15008 + 100 * i
                zt: list[subprocess.Popen[str]] = []
                for node, ip in (("n2", N2_IP), ("n1", N1_IP)):
                    cmd = [
                        "-m", "ztunnel", "--node", node, "--config", str(cfg),
                        "--ca-dir", str(ca), "--hbone-addr", f"{ip}:{hbone}",
                        "--admin-addr", f"{ip}:0", "--metrics-addr", f"{ip}:0",
                        "--readiness-addr", f"{ip}:0", "--redirect", "none", "--ktls", "off",
                        "--pool-idle", "3600", "--log-level", "warning",
                    ]  # fmt: skip
                    if node == "n1":
                        cmd += ["--outbound-addr", f"{N1_IP}:{outbound_port(i)}"]
                    p = spawn(cmd, tree)
                    procs.append(p)
                    zt.append(p)
                    wait_line(p, f"ztunnel {node} ({name})")
                # Client-side process first in the CPU columns.
                modes.append(Mode(name, vip(i), 80, (zt[1].pid, zt[0].pid)))
                if a.profile:
                    for node, p in (("n1", zt[1]), ("n2", zt[0])):
                        out = Path(a.profile) / f"{name}-{node}.txt"
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(p.pid), "--format", "raw",
                             "--rate", "200", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        ))  # fmt: skip
            loads = set(a.loads.split(","))
            for m in modes:  # warm-up: pooled HBONE connection, TLS, windows, caches
                run_load(m, "bulk", argparse.Namespace(bulk_mib=64, bulk_seconds=5))
                run_load(m, "rr", argparse.Namespace(seconds=0.5, conns=a.conns))
            for r in range(a.rounds):
                if "bulk" in loads:
                    for m in modes:
                        m.bulk.append(run_load(m, "bulk", a))
                if "rr" in loads:
                    for m in modes:
                        m.rr.append(run_load(m, "rr", a))
                if "http" in loads:
                    for rate in a.http_rates:
                        for m in modes:
                            m.http.setdefault(rate, []).append(run_load(m, "http", a, rate))
                print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
            if a.strace:  # after the measured rounds: tracing costs the traced CPU
                Path(a.strace).mkdir(parents=True, exist_ok=True)
                for rate in a.http_rates if "http" in loads else ():
                    for m in modes[1:]:
                        s = run_load(m, "http", a, rate, strace=Path(a.strace))
                        print(f"strace {m.name} http@{rate:g}: {s['requests']} requests",
                              file=sys.stderr)  # fmt: skip
        finally:
            for spy in spies:  # py-spy writes its profile on SIGINT
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    report(modes, a)


def report(modes: list[Mode], a: argparse.Namespace) -> None:
    if modes[0].bulk or modes[0].rr:
        report_stream(modes, a)
    if modes[0].http:
        report_http(modes, a)
    if a.json:
        print(json.dumps([m.__dict__ for m in modes], default=str))


def report_http(modes: list[Mode], a: argparse.Namespace) -> None:
    """CPU µs per request of each ztunnel, per rate; the ratio of this tree to the base."""
    med = statistics.median
    print(
        f"http/1.1 keep-alive 0 B (loadgen, open loop; rate 0 = max, closed loop), "
        f"{a.http_conns} conns, {a.http_seconds:g} s, medians of {a.rounds} interleaved "
        "rounds; CPU = µs per request, ztunnel client (n1) + server (n2)"
    )
    print(f"{'path':7} {'rate':>6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'n1 µs':>7} {'n2 µs':>7} {'sum µs':>7}")  # fmt: skip
    sums: dict[tuple[str, float], float] = {}
    for rate in a.http_rates:
        for m in modes:
            runs = m.http[rate]
            rps = med(r["achieved_rate"] for r in runs)
            p50 = med(r["latency_ms"]["p50"] for r in runs)
            p99 = med(r["latency_ms"]["p99"] for r in runs)
            if m.pids:
                us = [med(r["cpu"][k] / r["requests"] * 1e6 for r in runs) for k in (0, 1)]
                tot = med(sum(r["cpu"]) / r["requests"] * 1e6 for r in runs)
                sums[(m.name, rate)] = tot
                cpu = f"{us[0]:7.1f} {us[1]:7.1f} {tot:7.1f}"
            else:
                cpu = f"{'-':>7} {'-':>7} {'-':>7}"
            print(f"{m.name:7} {rate:6g} {rps:8.0f} {p50:7.3f} {p99:7.3f} {cpu}")
    for rate in a.http_rates:
        if ("base", rate) in sums:
            ratio = sums[("hbone", rate)] / sums[("base", rate)]
            print(f"hbone/base CPU per request at rate {rate:g}: {ratio:.3f}x")


def _med(xs: Iterable[float]) -> float:
    """The median, NaN (printed "nan") for a load that was not run (`--loads bulk` alone)."""
    got = list(xs)
    return statistics.median(got) if got else math.nan


def report_stream(modes: list[Mode], a: argparse.Namespace) -> None:
    med = _med
    rows = []
    for m in modes:
        mib_s = med(b["bytes"] / b["seconds"] / (1 << 20) for b in m.bulk)
        rps = med(r["requests"] / r["seconds"] for r in m.rr)
        p50 = med(r["p50_ms"] for r in m.rr)
        p99 = med(r["p99_ms"] for r in m.rr)
        cpu_gib: list[float] | None = None
        cpu_kreq: list[float] | None = None
        if m.pids:
            cpu_gib = [med(b["cpu"][k] / (b["bytes"] / (1 << 30)) for b in m.bulk) for k in (0, 1)]
            cpu_kreq = [med(r["cpu"][k] / (r["requests"] / 1000) for r in m.rr) for k in (0, 1)]
        rows.append((m.name, mib_s, rps, p50, p99, cpu_gib, cpu_kreq))
    print(
        f"medians of {a.rounds} interleaved rounds; bulk: 1 stream, {a.bulk_mib} MiB or "
        f"{a.bulk_seconds:g} s; rr: {MSG} B, {a.conns} conns, {a.seconds:g} s; "
        "CPU = ztunnel client / server process"
    )
    print(
        f"{'path':7} {'bulk MiB/s':>10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU s/GiB':>13} {'CPU s/1k req':>13}"
    )
    for name, mib_s, rps, p50, p99, cg, ck in rows:
        cgs = f"{cg[0]:.2f}/{cg[1]:.2f}" if cg else "-"
        cks = f"{ck[0]:.3f}/{ck[1]:.3f}" if ck else "-"
        print(f"{name:7} {mib_s:10.1f} {rps:8.0f} {p50:7.3f} {p99:7.3f} {cgs:>13} {cks:>13}")
    d = rows[0]
    for name, mib_s, rps, p50, p99, _, _ in rows[1:]:
        print(
            f"{name + '/direct':14} bulk {mib_s / d[1]:.3f}x  req/s {rps / d[2]:.3f}x  "
            f"p50 {p50 / d[3]:.2f}x  p99 {p99 / d[4]:.2f}x"
        )
    if len(rows) > 2:
        h, b = rows[1], rows[2]
        print(
            f"{'hbone/base':14} bulk {h[1] / b[1]:.3f}x  req/s {h[2] / b[2]:.3f}x  "
            f"p50 {h[3] / b[3]:.2f}x  p99 {h[4] / b[4]:.2f}x  "
            f"CPU/GiB {sum(h[5] or ()) / sum(b[5] or (1,)):.2f}x  "
            f"CPU/1k req {sum(h[6] or ()) / sum(b[6] or (1,)):.2f}x"
        )


# -- the outer process: the namespace and the redirect ------------------------------------


def outer_main(a: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("tunnel_bench: needs root (a network namespace and a netfilter REDIRECT)",
              file=sys.stderr)  # fmt: skip
        return 2
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            print(f"tunnel_bench: `{tool}` not found", file=sys.stderr)
            return 2
    ns = f"am-{secrets.token_hex(2)}-bench"

    def run(*cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)

    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        run("ip", "link", "set", "lo", "up")
        run("ip", "route", "add", "10.96.0.0/16", "dev", "lo", "src", N1_IP)
        pairs = 2 if a.base else 1
        for i in range(pairs):
            run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", vip(i),
                "--dport", "80", "-j", "REDIRECT", "--to-ports", str(outbound_port(i)))  # fmt: skip
        inner = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.tunnel_bench",
             "--role", "inside", *argv],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, check=False,
        )  # fmt: skip
        return inner.returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bulk-mib", type=int, default=1024)
    p.add_argument("--bulk-seconds", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=5.0, help="request/response duration")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--loads", default="bulk,rr", help="any of bulk,rr,http (comma-separated)")
    p.add_argument("--http-rates", type=lambda v: [float(x) for x in v.split(",")],
                   default=[1000.0, 0.0], help="http loads' request rates; 0 = max")  # fmt: skip
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument("--http-conns", type=int, default=16)
    p.add_argument("--strace", help="a directory for strace -c of each ztunnel (http loads)")
    p.add_argument("--base", help="a source tree to run as a second ztunnel pair (before)")
    p.add_argument("--profile", help="a directory for py-spy profiles of each ztunnel (raw)")
    p.add_argument("--json", action="store_true", help="also print every sample as JSON")
    p.add_argument("--role", choices=["inside", "echo", "bulk", "rr"], help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.role is None:
        return outer_main(a, argv)
    if a.role == "inside":
        inside_main(a)
    elif a.role == "echo":
        asyncio.run(echo_main())
    else:
        host, _, port = a.target.rpartition(":")
        res = asyncio.run(
            bulk_main(host, int(port), a.bulk_mib << 20, a.bulk_seconds)
            if a.role == "bulk"
            else rr_main(host, int(port), a.seconds, a.conns)
        )
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
