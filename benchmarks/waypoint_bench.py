"""Waypoint cost: requests/s and p50/p99 through ztunnel → waypoint → ztunnel versus the L4
path (ztunnel → ztunnel), same run, same backend.

A child process holds the mesh on loopback: ztunnel n1 (client side; the original
destination is given per listener, as BPF would answer it), a waypoint with an 80/20
HTTPRoute split between two backend services, ztunnel n2 (HBONE :15008 of the backends'
node) and the lab's echo app per pod (HTTP/1.1, or h2c by prior knowledge). Two client-side
listeners lead to the two paths: a service labelled for the waypoint, and one opted out
(`istio.io/use-waypoint: none`) over the same pods. The repository's load generator (a
separate process) measures each path back to back; read the ratios, not the absolute figures
(the machine is shared).
With `--policies`, a third path goes through the same waypoint to a service carrying a
typical L7 policy set (RequestAuthentication, ALLOW by principal/method/path with a header
condition, DENY on a path, AUDIT on a method), so the policy hook's cost per request shows as
the ratio of mesh CPU per request with and without it.
All proxies share one Python process here, so the waypoint path's extra hop costs CPU from
the same core as the tunnels: a conservative figure. `--http2 --body-size 16384` is the
benchmark's HTTP/2 case (the waypoint speaks HTTP/1.1 upstream, appProtocol http); the
"upstream dials" column counts the CONNECTs the waypoint opened to backends in that run (pool
churn shows there); `--log FILE` includes the access log's cost, as in a proxy process.

`--ab TREE` is the waypoint's own A/B (issue 15): the same ztunnels and backends, and two real
`waypoint.main` processes (this tree's and TREE's, e.g. a `git worktree` of the base commit,
or `--new OTHER` for any two), each on its own address; the client's ztunnel is pointed at
one or the other case by case, alternating which goes first, for `--repeats` rounds of
`--cases` (HTTP/1.1 and h2c at 1,000 req/s, h2c with 16 KiB bodies, and both at maximum,
closed loop). Figures per tree: the waypoint process's CPU per request (its own /proc time:
the ztunnels' shown apart), the share of a core it used (near 1 at max: it is the limit;
below: the generator or the ztunnels are), rate and latency; medians, and the median of the
new/base ratio within each round, which cancels the machine's drift. `--new-pods N` runs the
new side as N processes behind one waypoint (replicas; the ztunnel spreads connections), the
measurement behind "one process or several" on a given machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WP_VIP, L4_VIP, POL_VIP = "10.96.0.10", "10.96.0.30", "10.96.0.13"


def _policies() -> list[dict[str, Any]]:
    """What a service owner typically writes: JWT accepted (the load has none, so requests
    pass unauthenticated after the token lookup), callers by principal, a few paths, an
    admin DENY, an AUDIT."""
    ref = [{"kind": "Service", "group": "", "name": "backend-pol"}]
    jwks = {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "kid": "k",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
            }
        ]
    }

    def ap(name: str, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"targetRefs": ref, "action": action, "rules": rules},
        }

    return [
        {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
         "metadata": {"name": "jwt", "namespace": "bench"},
         "spec": {"targetRefs": ref,
                  "jwtRules": [{"issuer": "https://issuer.test", "jwks": json.dumps(jwks)}]}},
        ap("deny-admin", "DENY", [{"to": [{"operation": {"paths": ["/admin/*", "*.php"]}}]}]),
        ap("audit-delete", "AUDIT", [{"to": [{"operation": {"methods": ["DELETE"]}}]}]),
        ap("allow-clients", "ALLOW", [
            {"from": [{"source": {"principals": ["cluster.local/ns/bench/sa/client"]}}],
             "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/", "/api/*"]}}],
             "when": [{"key": "request.headers[x-forbidden]", "notValues": ["*"]}]},
            {"from": [{"source": {"namespaces": ["monitoring"]}}],
             "to": [{"operation": {"paths": ["/metrics"]}}]},
        ]),
    ]  # fmt: skip


def _manifest(
    wp_port: int, backend_port: int, wp_ips: tuple[str, ...] = ("127.0.0.9",)
) -> list[dict[str, Any]]:
    amb = {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}

    def pod(
        name: str, ip: str, node: str, labels: dict[str, str], sa: str | None = None
    ) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "bench", "labels": labels},
                "spec": {"nodeName": node, "serviceAccountName": sa or name},
                "status": {"podIP": ip}}  # fmt: skip

    def svc(
        name: str, vip: str, sel: dict[str, str], labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "bench", "labels": labels or {}},
                "spec": {"clusterIP": vip, "selector": sel,
                         "ports": [{"port": 80, "targetPort": backend_port,
                                    "appProtocol": "http"}]}}  # fmt: skip

    split = [{"name": "v1", "port": 80, "weight": 80}, {"name": "v2", "port": 80, "weight": 20}]
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
         "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench", "labels": amb}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "waypoint", "namespace": "bench"},
         "spec": {"gatewayClassName": "waypoint",
                  "listeners": [{"name": "mesh", "port": wp_port, "protocol": "HBONE"}]}},
        pod("client", "127.0.0.1", "n1", {"app": "client"}),
        *(pod("waypoint" if i == 0 else f"waypoint-{i}", ip, "n1",
              {"gateway.networking.k8s.io/gateway-name": "waypoint",
               "istio.io/dataplane-mode": "none"}, "waypoint") for i, ip in enumerate(wp_ips)),
        pod("backend-v1", "127.0.0.3", "n2", {"app": "backend", "version": "v1"}),
        pod("backend-v2", "127.0.0.4", "n2", {"app": "backend", "version": "v2"}),
        svc("backend", WP_VIP, {"app": "backend"}),
        svc("v1", "10.96.0.11", {"version": "v1"}),
        svc("v2", "10.96.0.12", {"version": "v2"}),
        svc("backend-l4", L4_VIP, {"app": "backend"}, {"istio.io/use-waypoint": "none"}),
        svc("backend-pol", POL_VIP, {"app": "backend"}),
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "split", "namespace": "bench"},
         "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend"}],
                  "rules": [{"backendRefs": split, "filters": [
                      {"type": "ResponseHeaderModifier",
                       "responseHeaderModifier": {"set": [{"name": "x-via",
                                                           "value": "waypoint"}]}}]}]}},
    ]  # fmt: skip


def _fixed(dst: tuple[str, int], _sock: object) -> tuple[str, int]:
    return dst


async def _serve() -> None:
    from certs.ca import CertificateAuthority
    from mesh.apps.echo import HttpEcho
    from mesh.config.parse import parse_objects
    from mesh.config.snapshot import Snapshot
    from mesh.hbone import serve
    from mesh.identity.manager import Identities
    from mesh.metrics import MeshMetrics
    from waypoint.proxy import Waypoint
    from ztunnel.proxy import InboundHbone, Node, Outbound

    # The lab's own app (HTTP/1.1, or h2c by prior knowledge): an HTTP/2 client reaches it
    # directly on the L4 path, and through the waypoint as HTTP/1.1 (appProtocol http).
    loop = asyncio.get_running_loop()
    ident = {"pod": "backend", "namespace": "bench"}
    b1 = await loop.create_server(lambda: HttpEcho(ident), "127.0.0.3", 0)
    bport = b1.sockets[0].getsockname()[1]
    b2 = await loop.create_server(lambda: HttpEcho(ident), "127.0.0.4", bport)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Identities(CertificateAuthority.init(Path(tmp) / "ca"))
        snap: list[Snapshot] = [Snapshot()]
        n2 = Node("n2", lambda: snap[0], ids, MeshMetrics())
        h2srv = await serve("127.0.0.2", 0, ids.server_context(n2.identity), InboundHbone(n2),
                            trust_domain="cluster.local")  # fmt: skip
        h2port = h2srv.sockets[0].getsockname()[1]
        wp = Waypoint("bench", "waypoint", lambda: snap[0], ids, node_ports={"n2": h2port})
        await wp.listen("127.0.0.9", 0)
        snap[0] = parse_objects(_manifest(wp.port, bport) + _policies())
        for vip, via_waypoint in ((WP_VIP, True), (L4_VIP, False)):
            found = snap[0].service_by_vip(vip, 80)
            assert found is not None
            assert (snap[0].waypoint_for_service(found[0]) is not None) == via_waypoint
        n1 = Node("n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=h2port)
        ports = {}
        for name, vip in (("waypoint", WP_VIP), ("l4", L4_VIP), ("policies", POL_VIP)):
            dst = (vip, 80)
            srv = await loop.create_server(
                Outbound(n1, functools.partial(_fixed, dst)).protocol, "127.0.0.1", 0
            )
            ports[name] = srv.sockets[0].getsockname()[1]
        print(json.dumps(ports), flush=True)

        def stats() -> None:
            # One line in, one JSON line out: the parent reads the waypoint's counters
            # around each run (how many upstream CONNECTs a run cost, for one).
            if not sys.stdin.readline():
                loop.remove_reader(sys.stdin.fileno())
                return
            up = wp.upstreams
            out = {"upstream_dials": up.dials, "upstream_idle_h1": up.idle_h1(),
                   "hbone_streams": wp.inbound.streams}  # fmt: skip
            print(json.dumps(out), flush=True)

        with contextlib.suppress(OSError):  # stdin not pollable (run by hand): no stats
            loop.add_reader(sys.stdin.fileno(), stats)
        await asyncio.Event().wait()
    b1.close()
    b2.close()


WAYPOINT_IPS = ("127.0.0.9", "127.0.0.10")  # one per tree in an A/B run, swapped per run


async def _serve_split(workdir: Path, wp_port: int, pods: dict[str, tuple[str, ...]]) -> None:
    """The mesh without the waypoint, for `--ab`: the waypoints are real `waypoint.main`
    processes (one per tree, started by the parent) reading the config and CA written here,
    so their CPU is measured on its own. Which one the client's ztunnel dials is the
    snapshot's choice: the parent swaps it with a `use LABEL` line on stdin. A label with
    several pods (`--new-pods`) is one waypoint of several processes, as a Deployment with
    replicas is: the ztunnel picks one per connection."""
    import yaml

    from certs.ca import CertificateAuthority
    from mesh.apps.echo import HttpEcho
    from mesh.config.parse import parse_objects
    from mesh.config.snapshot import Snapshot
    from mesh.hbone import serve
    from mesh.identity.manager import Identities
    from mesh.metrics import MeshMetrics
    from ztunnel.proxy import InboundHbone, Node, Outbound

    loop = asyncio.get_running_loop()
    ident = {"pod": "backend", "namespace": "bench"}
    b1 = await loop.create_server(lambda: HttpEcho(ident), "127.0.0.3", 0)
    bport = b1.sockets[0].getsockname()[1]
    await loop.create_server(lambda: HttpEcho(ident), "127.0.0.4", bport)
    ids = Identities(CertificateAuthority.init(workdir / "ca"))
    snaps = {
        k: parse_objects(_manifest(wp_port, bport, ips) + _policies()) for k, ips in pods.items()
    }
    (workdir / "mesh.yaml").write_text(
        yaml.safe_dump_all(_manifest(wp_port, bport) + _policies(), sort_keys=False)
    )
    snap: list[Snapshot] = [next(iter(snaps.values()))]
    n2 = Node("n2", lambda: snap[0], ids, MeshMetrics())
    h2srv = await serve("127.0.0.2", 0, ids.server_context(n2.identity), InboundHbone(n2),
                        trust_domain="cluster.local")  # fmt: skip
    h2port = h2srv.sockets[0].getsockname()[1]
    n1 = Node("n1", lambda: snap[0], ids, MeshMetrics(), hbone_port=h2port)
    ports = {"hbone": h2port}
    for name, vip in (("waypoint", WP_VIP), ("l4", L4_VIP), ("policies", POL_VIP)):
        srv = await loop.create_server(
            Outbound(n1, functools.partial(_fixed, (vip, 80))).protocol, "127.0.0.1", 0
        )
        ports[name] = srv.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)

    def command() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(sys.stdin.fileno())
            return
        label = line.split()[-1]
        snap[0] = snaps[label]
        print(json.dumps({"using": label}), flush=True)

    loop.add_reader(sys.stdin.fileno(), command)
    await asyncio.Event().wait()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_waypoint(
    tree: Path, ip: str, port: int, workdir: Path, hbone: int
) -> subprocess.Popen[str]:
    """The tree's own waypoint process, as production runs it (`waypoint.main`: uvloop, the
    batched access log to stderr at info), its log to a file beside the config."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    log = open(workdir / f"waypoint-{ip}.log", "w")  # noqa: SIM115  (closed by the child's exit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "waypoint.main", "--namespace", "bench", "--name", "waypoint",
         "--config", str(workdir / "mesh.yaml"), "--ca-dir", str(workdir / "ca"),
         "--hbone-addr", f"{ip}:{port}", "--upstream-hbone-port", str(hbone),
         "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0",
         "--admin-addr", "127.0.0.1:0"],
        env=env, cwd=tree, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    log.close()
    assert proc.stdout is not None
    while "hbone on" not in (line := proc.stdout.readline()):
        if not line:
            raise RuntimeError(f"waypoint from {tree} exited: see {workdir}/waypoint-{ip}.log")
    return proc


# (name, http2, body bytes, rate; 0 = maximum, closed loop)
AB_CASES = {
    "h1-1k": (False, 0, 1000.0),
    "h2-1k": (True, 0, 1000.0),
    "h2-16k-1k": (True, 16384, 1000.0),
    "h1-max": (False, 0, 0.0),
    "h2-max": (True, 0, 0.0),
}


def ab_main(args: argparse.Namespace) -> int:
    """Waypoint CPU per request (its own process only) and rates, this tree against
    `--ab TREE` (e.g. a `git worktree` of the base commit), the two waypoints run alternately
    case by case and repeat by repeat behind the same ztunnels and backends; medians."""
    import statistics

    trees = {"new": Path(args.new).resolve() if args.new else ROOT, "base": Path(args.ab).resolve()}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in AB_CASES:
            raise SystemExit(f"--cases: unknown case {c!r} (known: {', '.join(AB_CASES)})")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="wpbench-") as tmp:
        workdir = Path(tmp)
        wp_port = _free_port(WAYPOINT_IPS[0])
        # new: 127.0.0.9 (+ .11, .12, ... with --new-pods); base: 127.0.0.10
        extra = tuple(f"127.0.0.{11 + i}" for i in range(args.new_pods - 1))
        pods = {"new": (WAYPOINT_IPS[0], *extra), "base": (WAYPOINT_IPS[1],)}
        mesh = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.waypoint_bench",
                "--serve-split",
                tmp,
                "--wp-port",
                str(wp_port),
                "--pods",
                json.dumps(pods),
            ],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        wps: dict[str, list[subprocess.Popen[str]]] = {}
        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            assert mesh.stdin is not None and mesh.stdout is not None
            ports = json.loads(mesh.stdout.readline())
            for label, tree in trees.items():
                wps[label] = [
                    _start_waypoint(tree, ip, wp_port, workdir, ports["hbone"])
                    for ip in pods[label]
                ]

            def wp_cpu(label: str) -> float:
                return sum(_cpu_seconds(w.pid) for w in wps[label])

            def use(label: str) -> None:
                assert mesh.stdin is not None and mesh.stdout is not None
                mesh.stdin.write(f"use {label}\n")
                mesh.stdin.flush()
                mesh.stdout.readline()

            for label in trees:  # warm up: pools, TLS sessions, imports
                use(label)
                assert _via(ports["waypoint"]) == "waypoint"
            for rep in range(args.repeats):
                for case in cases:
                    http2, body, rate = AB_CASES[case]
                    order = list(trees) if rep % 2 == 0 else list(reversed(trees))
                    for label in order:
                        use(label)
                        run = argparse.Namespace(
                            rate=rate,
                            duration=args.duration,
                            connections=args.connections,
                            streams=args.streams,
                            body_size=body,
                            http2=http2,
                        )
                        w0, m0 = wp_cpu(label), _cpu_seconds(mesh.pid)
                        t0 = time.monotonic()
                        r = _loadgen(ports["waypoint"], run)
                        wall = time.monotonic() - t0
                        w1, m1 = wp_cpu(label), _cpu_seconds(mesh.pid)
                        n = max(1, sum(r.get("statuses", {}).values()))
                        lat = r.get("latency_ms", r)
                        row = {
                            "rate": float(r.get("achieved_rate", 0.0)),
                            "p50": float(lat.get("p50", float("nan"))),
                            "p99": float(lat.get("p99", float("nan"))),
                            "errors": float(r.get("errors", 0)),
                            "wp_us": (w1 - w0) / n * 1e6,
                            "ztunnels_us": (m1 - m0) / n * 1e6,
                            # share of one core the waypoint used: near 1.0 at max, it is
                            # the bottleneck; well below, the generator or ztunnels are
                            "wp_core": (w1 - w0) / wall,
                        }
                        samples.setdefault((case, label), []).append(row)
                        print(
                            f"# rep {rep} {case:<10} {label:<5} "
                            + " ".join(f"{k}={v:.1f}" for k, v in row.items()),
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            procs = [*(w for ws in wps.values() for w in ws), mesh]
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"waypoint A/B, medians of {args.repeats}: new = {trees['new']}, base = {trees['base']}")
    head = f"{'case':<11}{'tree':<6}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    print(f"{head}{'waypoint us/req':>17}{'ztunnels us/req':>17}{'wp cores':>10}")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for case in cases:
        for label in trees:
            rows = samples.get((case, label), [])
            m = {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}
            med[(case, label)] = m
            if m:
                print(
                    f"{case:<11}{label:<6}{m['rate']:>8.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}"
                    f"{m['errors']:>8.0f}{m['wp_us']:>17.0f}{m['ztunnels_us']:>17.0f}"
                    f"{m['wp_core']:>10.2f}"
                )
    print("new/base ratios (median of each):")
    for case in cases:
        a, b = med.get((case, "new")), med.get((case, "base"))
        if a and b and b["wp_us"] and b["rate"]:
            print(
                f"  {case:<11} waypoint CPU/req {a['wp_us'] / b['wp_us']:.2f}"
                f"  req/s {a['rate'] / b['rate']:.2f}  p99 {a['p99'] / b['p99']:.2f}"
            )
    # Each repeat ran the two trees back to back: the ratio within a repeat cancels the
    # machine's drift (other work comes and goes), so its median is the steadier figure.
    print("new/base paired ratios (median over repeats of the ratio within each repeat):")
    for case in cases:
        new, base = samples.get((case, "new"), []), samples.get((case, "base"), [])
        pairs = list(zip(new, base, strict=False))  # (a run cut short leaves one side longer)
        cpus = [n["wp_us"] / b["wp_us"] for n, b in pairs if b["wp_us"]]
        rates = [n["rate"] / b["rate"] for n, b in pairs if b["rate"]]
        if cpus and rates:
            print(
                f"  {case:<11} waypoint CPU/req {statistics.median(cpus):.2f}"
                f" (range {min(cpus):.2f}-{max(cpus):.2f})  req/s {statistics.median(rates):.2f}"
            )
    return 0


def _log_to(path: str) -> None:
    """stderr to `path` and logging at info, the way `mesh.process.run` sets a proxy up
    (with the batched access-log writer where this tree has one)."""
    import logging

    from mesh import accesslog

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    writer = getattr(accesslog, "AccessLogWriter", None)
    if writer is not None:
        accesslog.install(writer(2))


def _loadgen(port: int, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.loadgen", f"http://127.0.0.1:{port}/",
           "--rate", str(args.rate), "--duration", str(args.duration),
           "--connections", str(args.connections), "--streams", str(args.streams),
           "--body-size", str(args.body_size)]  # fmt: skip
    if args.http2:
        cmd.append("--http2")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of the mesh process: with the load generator on the same two cores,
    req/s may measure the generator; CPU per request measures the proxies."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _via(port: int) -> str | None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.decode().partition(":")
        if k.strip().lower() == "x-via":
            return v.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--log",
        metavar="FILE",
        help="the proxies log at info to FILE, access log included, as the processes do "
        "(default: no logging, so the figures leave the access log out)",
    )
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rate", type=float, default=0, help="requests/s (0 = maximum, closed loop)")
    p.add_argument(
        "--policies", action="store_true", help="also measure the waypoint with L7 policies"
    )
    p.add_argument("--http2", action="store_true", help="the client speaks HTTP/2 (h2c)")
    p.add_argument("--streams", type=int, default=32, help="HTTP/2 streams per connection")
    p.add_argument("--body-size", type=int, default=0, help="request body bytes (POST)")
    p.add_argument("--serve-split", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--wp-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--ab",
        metavar="TREE",
        help="A/B: this tree's waypoint process against TREE's (a checkout of the base "
        "commit), alternately, --repeats times over --cases; waypoint-only CPU per request",
    )
    p.add_argument("--new", metavar="TREE", help="with --ab: the 'new' side (default: this tree)")
    p.add_argument(
        "--new-pods",
        type=int,
        default=1,
        help="with --ab: the new side runs as this many waypoint processes (pods of one "
        "waypoint; the ztunnel spreads connections): CPU per request sums them",
    )
    p.add_argument("--pods", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help="with --ab: rounds of all cases")
    p.add_argument("--cases", default=",".join(AB_CASES), help="with --ab: which cases")
    args = p.parse_args(argv)
    if args.serve_split:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        given = json.loads(args.pods) if args.pods else {"new": [WAYPOINT_IPS[0]]}
        pods = {k: tuple(v) for k, v in given.items()}
        asyncio.run(_serve_split(Path(args.serve_split), args.wp_port, pods))
        return 0
    if args.ab:
        return ab_main(args)
    if args.serve:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        if args.log:
            _log_to(args.log)
        asyncio.run(_serve())
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = ["--log", args.log] if args.log else []
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.waypoint_bench", "--serve", *log],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def stats() -> dict[str, int]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        out: dict[str, int] = json.loads(child.stdout.readline())
        return out

    try:
        assert child.stdout is not None
        ports = json.loads(child.stdout.readline())
        # Prove each listener takes the path it is named for: only the waypoint's route adds
        # the x-via response header.
        assert _via(ports["waypoint"]) == "waypoint" and _via(ports["l4"]) is None
        rows = []
        paths = [("L4 (ztunnel→ztunnel)", ports["l4"]),
                 ("L7 (ztunnel→waypoint→ztunnel)", ports["waypoint"])]  # fmt: skip
        if args.policies:
            paths.append(("L7 + policies", ports["policies"]))
        for name, port in paths:
            cpu0, s0 = _cpu_seconds(child.pid), stats()
            r = _loadgen(port, args)
            r["mesh_cpu_s"] = _cpu_seconds(child.pid) - cpu0
            s1 = stats()
            r["waypoint"] = {k: s1[k] - s0[k] for k in ("upstream_dials", "hbone_streams")}
            r["waypoint"]["upstream_idle_h1"] = s1["upstream_idle_h1"]
            rows.append((name, r))
    finally:
        child.terminate()
        child.wait(5)
    cols = f"{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'mesh CPU us/req':>17}"
    print(f"{'path':<32}{cols}{'upstream dials':>16}")
    for name, r in rows:
        pct = r.get("latency_ms", r)
        n = max(1, sum(r.get("statuses", {}).values()))
        print(
            f"{name:<32}{r.get('achieved_rate', 0):>10.0f}{pct.get('p50', float('nan')):>10.2f}"
            f"{pct.get('p99', float('nan')):>10.2f}{r.get('errors', 0):>8}"
            f"{r['mesh_cpu_s'] / n * 1e6:>17.0f}{r['waypoint']['upstream_dials']:>16}"
        )
    l4, l7 = rows[0][1], rows[1][1]
    if l4.get("achieved_rate"):
        print(
            f"waypoint/L4 throughput ratio: {l7.get('achieved_rate', 0) / l4['achieved_rate']:.2f}"
        )
    n4 = max(1, sum(l4.get("statuses", {}).values()))
    n7 = max(1, sum(l7.get("statuses", {}).values()))
    if l4["mesh_cpu_s"]:
        ratio = (l7["mesh_cpu_s"] / n7) / (l4["mesh_cpu_s"] / n4)
        print(f"waypoint/L4 mesh CPU per request ratio: {ratio:.2f}")
    if args.policies:
        lp = rows[2][1]
        npol = max(1, sum(lp.get("statuses", {}).values()))
        bad = {k: v for k, v in lp.get("statuses", {}).items() if str(k) != "200"}
        if l7["mesh_cpu_s"]:
            ratio = (lp["mesh_cpu_s"] / npol) / (l7["mesh_cpu_s"] / n7)
            print(f"policies/no-policies waypoint mesh CPU per request ratio: {ratio:.2f}")
        if bad:
            print(f"policy path answered non-200: {bad} (the policy set should allow the load)")
    p50 = l4.get("latency_ms", l4).get("p50")
    if p50:
        print(f"waypoint/L4 p50 latency ratio: {l7.get('latency_ms', l7).get('p50', 0) / p50:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
