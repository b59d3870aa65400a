"""`meshctl bench`'s kTLS part: where the host kernel has no kTLS, one boot of a guest kernel
that has it (scripts/ktls-guest.sh: Debian's kernel under QEMU/TCG), and in it, interleaved
with repeats, no mesh, a ztunnel pair with user-space TLS (`--ktls off`) and the same pair with
kTLS (`--ktls on`). The figures come back to the host as JSON through a directory the guest
may write (virtme-ng shares the host's files), and `benchmarks.report` renders them.

Why not a lab in the guest: under TCG one Python start with our imports takes about a minute,
and a lab starts one per ztunnel, pod, load run and bulk run (the guest demo's lab takes ~11
minutes for one pass). So the rig is the one of `benchmarks.ktls_bench`, real ztunnel code on
loopback: ztunnel's Outbound on node 1, HBONE (mTLS + HTTP/2 CONNECT) to node 2's inbound,
on to the app, with the pair forked into a process of its own after the imports (cheap), so
that its CPU time is the mesh's alone. No BPF capture: the client dials ztunnel's outbound
listener, which is told the original destination. The load generator, the echo server and
the bulk sink run in the parent.

    host:  python -m benchmarks.ktls_guest host --out DIR [--quick]   (what meshctl bench calls)
    guest: python -m benchmarks.ktls_guest guest --json PATH [--quick] (what the guest runs)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.report import median

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "ktls-guest.sh"
RESULT_FILE = "ktls-guest.json"

SINK_VIP = "10.96.0.10"
ECHO_VIP = "10.96.0.11"
POD_IP = "127.0.0.3"

MODES: dict[str, str] = {
    "nomesh": "no mesh (client -> app directly)",
    "userspace": "ztunnel pair, user-space TLS (--ktls off)",
    "ktls": "ztunnel pair, kTLS (--ktls on)",
}


@dataclass(frozen=True, slots=True)
class GuestPreset:
    """Sized for TCG, under which the guest runs tens of times slower than the host (measured:
    one plaintext stream over raw loopback ~25x slower): a rate the guest holds with room to
    spare, and bulk streams long enough to last seconds."""

    repeats: int
    bulk_mib: int
    rate: float
    duration: float
    connections: int = 4


def guest_preset(quick: bool) -> GuestPreset:
    if quick:
        return GuestPreset(repeats=2, bulk_mib=16, rate=50.0, duration=4.0)
    return GuestPreset(repeats=3, bulk_mib=48, rate=50.0, duration=10.0)


# -- the summary (pure: unit-tested on the host) -----------------------------------------------


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode over the repeats, bulk as a fraction of no mesh, and the ratios
    kTLS / user-space TLS. A figure that no repeat produced is None."""
    by_mode: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = [c for c in cells if c.get("mode") == mode and c.get("ok")]

        def med(part: str, key: str, mine: list[dict[str, Any]] = mine) -> float | None:
            vals = [float(c[part][key]) for c in mine if c.get(part, {}).get(key) is not None]
            return round(median(vals), 4) if vals else None

        by_mode[mode] = {
            "title": MODES[mode],
            "repeats": len(mine),
            "bulk_mib_per_s": med("bulk", "mib_per_s"),
            "bulk_mesh_cpu_s_per_gib": med("bulk", "mesh_cpu_s_per_gib"),
            "bulk_mesh_sys_s_per_gib": med("bulk", "mesh_sys_s_per_gib"),
            "bulk_all_cpu_s_per_gib": med("bulk", "all_cpu_s_per_gib"),
            "p50_ms": med("latency", "p50_ms"),
            "p99_ms": med("latency", "p99_ms"),
            "achieved_rate": med("latency", "achieved_rate"),
            "mesh_cpu_ms_per_request": med("latency", "mesh_cpu_ms_per_request"),
            "mesh_sys_ms_per_request": med("latency", "mesh_sys_ms_per_request"),
            "all_cpu_ms_per_request": med("latency", "all_cpu_ms_per_request"),
            "hbone_ciphers": sorted({x for c in mine for x in c.get("hbone_ciphers", [])}),
        }
    base = by_mode["nomesh"]["bulk_mib_per_s"]
    for m in by_mode.values():
        v = m["bulk_mib_per_s"]
        m["bulk_fraction_of_nomesh"] = round(v / base, 3) if v and base else None
    ratios: dict[str, float | None] = {}
    u, k = by_mode["userspace"], by_mode["ktls"]
    for key in ("bulk_mib_per_s", "bulk_mesh_cpu_s_per_gib", "p50_ms", "p99_ms",
                "mesh_cpu_ms_per_request"):  # fmt: skip
        a, b = u[key], k[key]
        ratios[key] = round(b / a, 3) if a and b is not None else None
    raw: dict[str, dict[str, float]] = {}
    for mode in RAW_MODES:
        figs = [c["raw"][mode] for c in cells if c.get("mode") == "raw" and c.get("ok")]
        if figs:
            raw[mode] = {k: round(median([float(f[k]) for f in figs]), 3)
                         for k in ("mib_per_s", "cpu_s_per_gib")}  # fmt: skip
    if "user-space TLS" in raw and "kTLS" in raw:
        u_raw, k_raw = raw["user-space TLS"], raw["kTLS"]
        ratios["raw_mib_per_s"] = round(k_raw["mib_per_s"] / u_raw["mib_per_s"], 3)
        ratios["raw_cpu_s_per_gib"] = round(k_raw["cpu_s_per_gib"] / u_raw["cpu_s_per_gib"], 3)
    plain = raw.get("plaintext", {}).get("mib_per_s")
    if plain:
        # the ceiling for any TLS path on this machine: the record layer alone against none
        for mode in ("user-space TLS", "kTLS"):
            if mode in raw:
                raw[mode]["fraction_of_plaintext"] = round(raw[mode]["mib_per_s"] / plain, 3)
    return {"modes": by_mode, "raw": raw, "ktls_over_userspace": ratios}


# -- the guest side ----------------------------------------------------------------------------


def _manifest(sink_port: int, echo_port: int) -> list[dict[str, Any]]:
    from benchmarks.ktls_bench import manifest

    docs = manifest(sink_port)
    docs.append(
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "echo", "namespace": "bench"},
         "spec": {"clusterIP": ECHO_VIP, "selector": {"app": "sink"},
                  "ports": [{"port": 80, "targetPort": echo_port}]}}
    )  # fmt: skip
    return docs


async def _serve_pair(ktls_on: bool, ca: Any, docs: list[dict[str, Any]], wfd: int) -> None:
    """Both nodes' ztunnel parts, as `ztunnel --ktls on|off` builds them, until SIGTERM; then
    one line on `wfd` says whether the HBONE connections were offloaded to the kernel."""
    from mesh.config.parse import parse_objects
    from mesh.hbone import serve
    from mesh.identity.manager import Identities
    from mesh.metrics import MeshMetrics
    from ztunnel.proxy import InboundHbone, Node, Outbound

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    snap = parse_objects(docs)
    ids = Identities(ca, ktls=ktls_on)
    n2 = Node("n2", lambda: snap, ids, MeshMetrics())
    hbone = await serve(
        "127.0.0.2", 0, ids.listener_context(n2.identity), InboundHbone(n2),
        trust_domain="cluster.local",
    )  # fmt: skip
    n1 = Node("n1", lambda: snap, ids, MeshMetrics(), hbone_port=hbone.sockets[0].getsockname()[1])
    outs: dict[str, asyncio.Server] = {}
    for name, vip in (("sink", SINK_VIP), ("echo", ECHO_VIP)):
        out = Outbound(n1, _fixed_dst(vip))
        outs[name] = await loop.create_server(out.protocol, "127.0.0.1", 0)
    ports = {k: s.sockets[0].getsockname()[1] for k, s in outs.items()}
    os.write(wfd, (json.dumps(ports) + "\n").encode())
    await stop.wait()
    conns = [c for cs in n1.pool._conns.values() for c in cs]
    live = [c.transport for c in conns if c.transport]
    offloaded = [t.get_extra_info("ktls") is True for t in live]
    ciphers = sorted({str(t.get_extra_info("cipher")) for t in live})
    os.write(wfd, (json.dumps({"offloaded": offloaded, "ciphers": ciphers}) + "\n").encode())
    for s in (*outs.values(), hbone):
        s.close()
    n1.pool.close()
    for t in (*n1.tasks, *n2.tasks):
        t.cancel()


def _fixed_dst(vip: str) -> Callable[[socket.socket], tuple[str, int]]:
    """What the capture would report as the original destination: the Service's VIP:80."""

    def dst(_sock: socket.socket) -> tuple[str, int]:
        return vip, 80

    return dst


def _child(ktls_on: bool, ca: Any, docs: list[dict[str, Any]], wfd: int) -> None:
    """The forked ztunnel pair; never returns into the parent's code."""
    rc = 0
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_pair(ktls_on, ca, docs, wfd))
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        os._exit(rc)


def _read_line(fd: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"the ztunnel pair said nothing within {timeout:.0f}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise EOFError("the ztunnel pair exited before it was ready")
        buf += chunk
    line, _, _rest = buf.partition(b"\n")
    out: dict[str, Any] = json.loads(line)
    return out


def _listen(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(1024)
    return s


def _system_ticks(pid: int) -> int:
    """stime alone (field 15 of /proc/<pid>/stat, counted from the last ')'): the kernel's
    share of a process's CPU, where kTLS does its crypto."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rpartition(")")[2].split()[12])
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


async def _measure(
    mode: str, p: GuestPreset, sink_sock: socket.socket, echo_sock: socket.socket,
    ports: dict[str, int] | None, child: int | None,
) -> dict[str, Any]:  # fmt: skip
    import argparse as ap

    from benchmarks import loadgen
    from benchmarks.ktls_bench import Sink, Source
    from mesh.apps.echo import HttpEcho

    loop = asyncio.get_running_loop()
    total = p.bulk_mib << 20
    sink = Sink(total)
    sink_srv = await loop.create_server(lambda: sink, sock=sink_sock)
    echo_srv = await loop.create_server(
        lambda: HttpEcho({"pod": "sink", "namespace": "bench"}), sock=echo_sock
    )
    if ports is None:
        bulk_addr = sink_sock.getsockname()[:2]
        echo_addr = echo_sock.getsockname()[:2]
    else:
        bulk_addr = ("127.0.0.1", ports["sink"])
        echo_addr = ("127.0.0.1", ports["echo"])
    pids = [child] if child else []

    def cpu() -> tuple[float, float, procstat.CpuSample]:
        return time.perf_counter(), _cpu_self(), procstat.sample_cpu(pids)

    def sys_s() -> float:
        return _system_ticks(child) / procstat.CLK_TCK if child else 0.0

    out: dict[str, Any] = {"mode": mode}
    try:
        # one request first, so that the SVIDs and the pooled HBONE connection (handshake
        # included) exist before anything is timed, as in a lab that has carried traffic
        reader, writer = await asyncio.open_connection(*echo_addr)
        writer.write(b"GET /warm HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(reader.read(), 120)
        writer.close()
        src = Source(total)
        transport, _ = await loop.create_connection(lambda: src, *bulk_addr)
        t0, c0, m0 = cpu()
        k0 = sys_s()
        await src.run()
        await asyncio.wait_for(sink.done, 600)
        t1, c1, m1 = cpu()
        k1 = sys_s()
        transport.close()
        gib = p.bulk_mib / 1024
        mesh_cpu = procstat.cpu_seconds(m0, m1)
        out["bulk"] = {
            "mib": p.bulk_mib,
            "seconds": round(t1 - t0, 3),
            "mib_per_s": round(p.bulk_mib / (t1 - t0), 2),
            "apps_cpu_s": round(c1 - c0, 3),
            "mesh_cpu_s": round(mesh_cpu, 3) if child else None,
            "mesh_cpu_s_per_gib": round(mesh_cpu / gib, 3) if child else None,
            # the kernel's part of it (kTLS: the record layer's crypto is in here)
            "mesh_sys_s_per_gib": round((k1 - k0) / gib, 3) if child else None,
            "all_cpu_s_per_gib": round((c1 - c0 + mesh_cpu) / gib, 3),
        }
        args = ap.Namespace(
            url=f"http://{echo_addr[0]}:{echo_addr[1]}/bench", rate=p.rate,
            duration=p.duration, connections=p.connections, streams=1, http2=False,
            body_size=0, samples=False, drain_ns=int(10e9),
        )  # fmt: skip
        t0, c0, m0 = cpu()
        k0 = sys_s()
        r = await loadgen.run(args)
        t1, c1, m1 = cpu()
        k1 = sys_s()
        n = int(r["completed"])
        mesh_cpu = procstat.cpu_seconds(m0, m1)
        out["latency"] = {
            "rate": p.rate,
            "connections": p.connections,
            "completed": n,
            "errors": r["errors"],
            "achieved_rate": r["achieved_rate"],
            "p50_ms": r["latency_ms"]["p50"],
            "p99_ms": r["latency_ms"]["p99"],
            "apps_cpu_s": round(c1 - c0, 3),
            "mesh_cpu_s": round(mesh_cpu, 3) if child else None,
            "mesh_cpu_ms_per_request": round(mesh_cpu * 1000 / n, 4) if child and n else None,
            "mesh_sys_ms_per_request": round((k1 - k0) * 1000 / n, 4) if child and n else None,
            "all_cpu_ms_per_request": round((c1 - c0 + mesh_cpu) * 1000 / n, 4) if n else None,
        }
    finally:
        sink_srv.close()
        echo_srv.close()
    return out


def run_cell(mode: str, p: GuestPreset, ca: Any) -> dict[str, Any]:
    """One mode once: fork the ztunnel pair (not for no mesh), measure from the parent, stop
    the pair by its PID and check that the HBONE connection was offloaded as asked."""
    import uvloop

    sink_sock, echo_sock = _listen(POD_IP), _listen(POD_IP)
    child: int | None = None
    rfd = -1
    ports: dict[str, int] | None = None
    try:
        if mode != "nomesh":
            docs = _manifest(sink_sock.getsockname()[1], echo_sock.getsockname()[1])
            rfd, wfd = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(rfd)
                sink_sock.close()
                echo_sock.close()
                _child(mode == "ktls", ca, docs, wfd)
            os.close(wfd)
            ports = {k: int(v) for k, v in _read_line(rfd, 300).items()}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            cell = runner.run(_measure(mode, p, sink_sock, echo_sock, ports, child))
        cell["ok"] = True
        if child is not None:
            os.kill(child, signal.SIGTERM)
            said = _read_line(rfd, 120)
            offloaded = said.get("offloaded", [])
            cell["hbone_offloaded"] = offloaded
            cell["hbone_ciphers"] = said.get("ciphers", [])
            if not offloaded or any(x != (mode == "ktls") for x in offloaded):
                cell["ok"] = False
                cell["error"] = f"{mode}: HBONE connections offloaded to kTLS: {offloaded}"
        return cell
    except (OSError, TimeoutError, EOFError, ValueError, RuntimeError, SystemExit) as exc:
        return {"mode": mode, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        sink_sock.close()
        echo_sock.close()
        if rfd >= 0:
            os.close(rfd)
        if child:
            _reap(child)


def _reap(pid: int) -> None:
    """Our forked child, by PID: TERM (already sent on success), then KILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


RAW_MODES = ("plaintext", "user-space TLS", "kTLS")
RAW_SUITE = "TLS_AES_256_GCM_SHA384"  # what the stdlib (user-space) side negotiates


def run_raw(ca: Any, mib: int) -> dict[str, Any]:
    """The record layer alone, no ztunnel: one stream over raw loopback sockets, both ends in
    this process, one cipher for both TLS rows. It tells what the kernel's TLS costs in this
    (emulated) machine, apart from anything our proxy does around it."""
    import uvloop

    from benchmarks.ktls_bench import raw_stream

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mode in RAW_MODES:
            f = await raw_stream(mode, ca, mib, RAW_SUITE)
            out[mode] = {"mib_per_s": round(f.mib_per_s, 2),
                         "cpu_s_per_gib": round(f.cpu_s_per_gib, 3)}  # fmt: skip
        return out

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return {"mode": "raw", "ok": True, "raw": runner.run(go())}
    except (OSError, AssertionError, ValueError, RuntimeError) as exc:
        return {"mode": "raw", "ok": False, "error": f"raw sockets: {type(exc).__name__}: {exc}"}


def crypto_facts(proc: Path = Path("/proc")) -> dict[str, Any]:
    """What the (emulated) CPU offers AES-GCM and which implementation the kernel picked for
    it: under TCG the crypto is emulated too, and these say how (read, not assumed)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in (proc / "cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("aes", "pclmulqdq", "avx", "avx2", "vaes", "vpclmulqdq")
                out["cpu_crypto_flags"] = [f for f in wanted if f in have]
                break
    with contextlib.suppress(OSError):
        best: tuple[int, str] | None = None
        for block in (proc / "crypto").read_text().split("\n\n"):
            entry = dict((k.strip(), v.strip()) for k, _, v in
                         (ln.partition(":") for ln in block.splitlines()))  # fmt: skip
            prio = entry.get("priority", "")
            if entry.get("name") == "gcm(aes)" and "driver" in entry:
                rank = int(prio) if prio.isdigit() else 0
                if best is None or rank > best[0]:
                    best = (rank, entry["driver"])
        if best is not None:
            out["kernel_gcm_aes_driver"] = best[1]
    return out


def _say(msg: str) -> None:
    print(msg, flush=True)  # the host shows these lines as they come


def guest_run(
    p: GuestPreset,
    modes: tuple[str, ...] = tuple(MODES),
    say: Callable[[str], None] = _say,
    save: Callable[[dict[str, Any]], None] | None = None,
    warmup: bool = False,
) -> dict[str, Any]:
    """Every mode `repeats` times, interleaved (A B C, A B C, ...), in this kernel. (`modes`
    narrower than all: the host's tests, whose kernel has no kTLS.) `save` gets the result so
    far after every run (status "partial"), so a host that stops waiting still has figures.
    `warmup`: each mode once, short and discarded, first: TCG translates guest code the first
    time it runs, which would otherwise land on whichever mode runs first (measured: the
    first no-mesh run's p99 was seconds, the second's milliseconds)."""
    from certs.ca import CertificateAuthority
    from mesh import ktls

    support = ktls.probe()
    result: dict[str, Any] = {
        "kernel": support.kernel,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rig": "in-process ztunnel pair (benchmarks.ktls_guest), not a lab",
        "preset": asdict(p),
        "modes": dict(MODES),
        "ktls_ciphers": list(support.ciphers),
    }
    if "ktls" in modes and not support.available:
        return {**result, "status": "failed", "reason": f"no kTLS in the guest: {support.reason}"}
    t_start = time.monotonic()
    cells: list[dict[str, Any]] = []
    planned = p.repeats * (len(modes) + ("ktls" in modes))

    def add(cell: dict[str, Any]) -> None:
        cells.append(cell)
        if save is not None:
            save(_finish(dict(result), cells, t_start, planned))

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca")
        if warmup:
            t0 = time.monotonic()
            short = replace(p, bulk_mib=min(p.bulk_mib, 2), duration=min(p.duration, 1.0))
            for mode in modes:
                run_cell(mode, short, ca)
            if "ktls" in modes:
                run_raw(ca, short.bulk_mib)
            say(f"[guest] warm-up (discarded) in {time.monotonic() - t0:.0f}s")
        for rnd in range(1, p.repeats + 1):
            for mode in modes:
                t0 = time.monotonic()
                cell = run_cell(mode, p, ca)
                cell["repeat"] = rnd
                add(cell)
                say(f"[guest] {mode} {rnd}/{p.repeats} in {time.monotonic() - t0:.0f}s: "
                    f"{_cell_line(cell)}")  # fmt: skip
            if "ktls" in modes:
                cell = run_raw(ca, p.bulk_mib)
                cell["repeat"] = rnd
                add(cell)
                say(f"[guest] raw sockets {rnd}/{p.repeats}: {cell.get('raw') or cell}")
    result.update(crypto_facts())  # after the runs: the kernel lists gcm(aes) once it is used
    return _finish(result, cells, t_start, planned)


def _finish(
    result: dict[str, Any], cells: list[dict[str, Any]], t_start: float, planned: int
) -> dict[str, Any]:
    result["cells"] = list(cells)
    result["summary"] = summarize(cells)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    bad = [c for c in cells if not c.get("ok")]
    if len(cells) < planned:
        result["status"] = "partial"
        result["planned_runs"] = planned
    else:
        result["status"] = "failed" if len(bad) == len(cells) else "ok"
    if bad:
        result["reason"] = "; ".join(sorted({str(c.get("error")) for c in bad}))
    return result


def _cell_line(c: dict[str, Any]) -> str:
    if not c.get("ok") and "bulk" not in c:
        return f"FAILED {c.get('error')}"
    b, lat = c.get("bulk", {}), c.get("latency", {})
    line = (
        f"bulk {b.get('mib_per_s')} MiB/s, mesh CPU {b.get('mesh_cpu_s_per_gib')} s/GiB; "
        f"@{lat.get('rate')}/s p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} ms, "
        f"mesh CPU {lat.get('mesh_cpu_ms_per_request')} ms/req"
    )
    return line if c.get("ok") else f"{line} (FAILED {c.get('error')})"


def guest_main(json_path: str, quick: bool) -> int:
    """The guest's entry (tests/ktls/guest_main.py calls it, in the one interpreter there)."""

    def save(partial: dict[str, Any]) -> None:
        Path(json_path).write_text(json.dumps(partial, indent=1) + "\n")

    try:
        result = guest_run(guest_preset(quick), save=save, warmup=True)
    except Exception as exc:  # the host must get a reason, not a missing file
        traceback.print_exc()
        result = {"status": "failed", "reason": f"guest bench crashed: {exc!r}"}
    Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"[guest] wrote {json_path}: status {result.get('status')}", flush=True)
    return 0 if result.get("status") == "ok" else 1


# -- the host side -----------------------------------------------------------------------------


def host_run(out_dir: Path, quick: bool, say: Callable[[str], None] = print,
             timeout: float | None = None, script: Path = SCRIPT) -> dict[str, Any]:  # fmt: skip
    """What `meshctl bench` puts under results["ktls_guest"]: the guest's JSON with a status,
    or status "skipped"/"failed" with the reason. Never raises for a missing QEMU or a guest
    that failed: the rest of the bench stands on its own."""
    from mesh import ktls

    host = ktls.probe()
    if host.available:
        return {
            "status": "skipped",
            "reason": f"the host kernel {host.kernel} has kTLS: the ambient-ktls mode runs in "
            "the host lab instead",
        }
    if timeout is None:
        timeout = 480.0 if quick else 900.0
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / RESULT_FILE).resolve()
    path.unlink(missing_ok=True)
    cmd = [str(script), "--no-tests", "--bench-json", str(path), *(["--quick"] if quick else [])]
    say(f"kTLS guest: {' '.join(cmd)} (at most {timeout:.0f}s)")
    t0 = time.monotonic()
    tail: list[str] = []
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", start_new_session=True, cwd=REPO_ROOT,
    )  # fmt: skip
    timed_out = False
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 5.0))
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            line = line.rstrip()
            tail = [*tail[-39:], line]
            if line.startswith(("[guest]", "ktls-guest:", "SKIPPED:")):
                say(f"kTLS guest: {line}")
    finally:
        if proc.poll() is None:
            # our own process group (vng and its QEMU), by the PID we started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = round(time.monotonic() - t0, 1)
    skipped = next((ln for ln in tail if ln.startswith("SKIPPED:")), None)
    if skipped:
        return {"status": "skipped", "reason": skipped.removeprefix("SKIPPED:").strip()}
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = f"the guest run took over {timeout:.0f}s" if timed_out else (
            f"no results from the guest (exit {proc.returncode}): {exc}")  # fmt: skip
        return {"status": "failed", "reason": why, "output_tail": tail[-15:]}
    result["host_elapsed_s"] = elapsed
    if result.get("status") == "partial":
        # stopped before the last run (timeout, or the guest died): what it measured stands,
        # and the report says how much of the plan that is
        done = [c for c in result.get("cells", []) if c.get("ok")]
        cause = f"took over {timeout:.0f}s" if timed_out else f"ended (exit {proc.returncode})"
        result["reason"] = (
            f"the guest run {cause} after {len(result.get('cells', []))} of"
            f" {result.get('planned_runs', '?')} runs; figures from those"
        )
        result["status"] = "ok" if done else "failed"
    result.setdefault("status", "failed")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="side", required=True)
    h = sub.add_parser("host", help="boot the guest once and collect its figures")
    h.add_argument("--out", default=".", help="directory for ktls-guest.json")
    h.add_argument("--quick", action="store_true")
    g = sub.add_parser("guest", help="run the modes in this kernel (inside the guest)")
    g.add_argument("--json", required=True, help="where to write the figures")
    g.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.side == "guest":
        return guest_main(args.json, args.quick)
    res = host_run(Path(args.out), args.quick)
    print(json.dumps({k: v for k, v in res.items() if k != "cells"}, indent=1))
    return 0 if res.get("status") != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
