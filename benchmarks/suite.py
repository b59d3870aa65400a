"""`meshctl bench`: no mesh, Envoy sidecars, ambient (and every faster path this tree has), and
the two Envoy peers of the same shape as ours (one Envoy per node behind our capture; Envoy as
the waypoint), one run, on the lab, measured the same way, reported as JSON + markdown + PNG
charts.

One lab per mode and density, brought up from a generated manifest through the lab's Python
API and torn down before the next (so modes never share a machine state and nothing is left
behind, Ctrl-C included). In each: the open-loop load generator (`benchmarks.loadgen`) runs
*inside the client pod* (its netns and cgroup, so the mesh's capture applies to it exactly as to
an app) against the server's Service VIP; the mesh's processes' CPU ticks are read from /proc
before and after each run; their PSS (and RSS) is read once the pods are ready. The machine is
shared and noisy, so what to read are the ratios within the run, never the absolute figures of
another.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks import envoy_waypoint, ktls_guest, node_envoy, procstat, report, sidecar
from benchmarks import modes as M
from benchmarks.node_envoy import NodeEnvoys
from meshctl.errors import UsageError
from meshctl.lab.lab import Lab
from meshctl.lab.names import CGROUP_ROOT, PIN_ROOT, STATE_ROOT, LabPaths, netns_path
from meshctl.lab.processes import REPO_ROOT, child_env, podexec_argv
from meshctl.lab.system import LabError
from meshctl.lab.ztunnels import enrol_request

H1, H2 = "http/1.1", "h2"
READY_PODS = 4  # pods timed per density (a sample each per repeat)
READY_SPAN = (
    "ambient: ambientmesh-cni ADD (its own start included) until a first answer through ztunnel"
    " (or until the ADD returns, if later: the runtime starts the app only then)",
    "sidecar: capture rules + Envoy start (no Python) until a first answer through Envoy",
    "node-envoy: BPF attach to the pod's cgroup + its listeners pushed to the running node"
    " Envoy (a watched file) until a first answer through Envoy; no plugin process starts in"
    " the span (ambient's includes the ambientmesh-cni plugin's own start)",
)
BIG = 16 * 1024


@dataclass(frozen=True, slots=True)
class Preset:
    """What to measure: (protocol, body bytes, rate; 0 = maximum) runs, and the rest."""

    runs: tuple[tuple[str, int, float], ...]
    duration: float
    bulk_mib: int
    densities: tuple[int, ...]
    enrol_reps: int
    reference_rate: float
    connections: int = 16
    h2_connections: int = 4
    h2_streams: int = 32
    repeats: int = 3


def full_preset() -> Preset:
    """What the issue's ratios need, sized to about 30 minutes for every mode on the 2-core
    machine with 3 repeats: the headline point (HTTP/1.1, small body, 1,000 req/s) and its
    curve (100, 1,000, maximum), HTTP/2 at 1,000 and maximum, the 16 KiB bodies at 1,000.
    Trimmed from 16 points of 10 s (every protocol x body x 100/1,000/5,000/max: with six
    modes and 3 repeats, 48 minutes of load alone before any lab comes up): 5,000 req/s sits
    between 1,000 and the maximum on the curve, and the large bodies' maximum rates only
    repeated the small bodies' ranking. 8 s at 1,000 req/s is 8,000 samples a run, 80 of
    them above the p99."""
    runs = (
        (H1, 0, 100.0),
        (H1, 0, 1000.0),
        (H1, 0, 0.0),
        (H2, 0, 1000.0),
        (H2, 0, 0.0),
        (H1, BIG, 1000.0),
        (H2, BIG, 1000.0),
    )
    return Preset(runs, 8.0, 256, (2, 20), 3, 1000.0)


def quick_preset() -> Preset:
    runs = (
        (H1, 0, 100.0),
        (H1, 0, 1000.0),
        (H1, 0, 0.0),
        (H2, 0, 1000.0),
        (H1, BIG, 1000.0),
        (H2, BIG, 1000.0),
    )
    # one repeat, so the report says every figure is a single run
    return Preset(runs, 3.0, 64, (2, 20), 2, 1000.0, repeats=1)


# -- progress --------------------------------------------------------------------------------


class Progress:
    """Progress lines with the elapsed time, so a long run shows where it is."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self.t0 = time.monotonic()
        self.write = write

    def __call__(self, msg: str) -> None:
        self.write(f"[{time.monotonic() - self.t0:6.1f}s] {msg}")


# -- measurements inside one lab -------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    mode: M.Mode
    lab: Lab
    say: Progress
    sidecars: M.Sidecars | None = None
    node_envoys: NodeEnvoys | None = None
    _pids: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        svc = self.lab.snapshot().service(M.NAMESPACE, "server")
        if svc is None or not svc.cluster_ip:
            raise LabError("the server Service has no VIP in the lab")
        return f"http://{svc.cluster_ip}:{M.SERVICE_PORT}/bench"

    def in_client(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return self.lab.exec_in_pod(M.NAMESPACE, "client", cmd, timeout=timeout)

    def wait_app(self, timeout: float = 45.0) -> dict[str, Any]:
        """Until the client gets an answer from the server through whatever is in between."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            res = self.in_client(
                ["python", "-m", "mesh.apps.client", self.url, "--timeout", "3"], timeout=20
            )
            for line in res.stdout.splitlines():
                with contextlib.suppress(ValueError):
                    reply = json.loads(line)
                    if reply.get("ok") and reply.get("status") == 200:
                        return dict(reply.get("body") or {})
            last = (res.stdout + res.stderr).strip()[-300:]
            time.sleep(0.3)
        raise LabError(f"client never got an answer from {self.url}: {last}")

    def pids(self) -> dict[str, int]:
        """The mesh's processes (and anything they started), refreshed per call."""
        out: dict[str, int] = {}
        for label, pid in M.mesh_pids(self.lab, self.mode, self.sidecars, self.node_envoys).items():
            for i, p in enumerate(procstat.descendants(pid)):
                out[label if i == 0 else f"{label}+{p}"] = p
        return out

    def memory(self, pods_per_node: int) -> dict[str, Any]:
        """PSS (the headline: a shared page is split between the processes mapping it, so one
        Envoy binary behind 40 sidecars is charged once) and RSS (each process charged for every
        page it maps, kept labelled for comparison) of the mesh's processes."""
        pids = self.pids()
        mem = procstat.memory_of(pids.values())
        by = {label: mem[p] for label, p in pids.items() if p in mem}
        pods = pods_per_node * len(M.NODES)
        pss = sum(m.pss_kib for m in by.values())
        rss = sum(m.rss_kib for m in by.values())
        return {
            "pods_per_node": pods_per_node,
            "pods": pods,
            "pss_kib": pss,
            "rss_kib": rss,
            "per_pod_pss_kib": round(pss / pods, 1),
            "per_pod_rss_kib": round(rss / pods, 1),
            "by_process": {k: {"pss_kib": m.pss_kib, "rss_kib": m.rss_kib} for k, m in by.items()},
        }

    def loadgen(self, proto: str, body: int, rate: float, p: Preset) -> dict[str, Any]:
        h2 = proto == H2
        conns = p.h2_connections if h2 and rate > 0 else p.connections
        cmd = [
            "python", "-m", "benchmarks.loadgen", self.url,
            "--rate", f"{rate:g}", "--duration", f"{p.duration:g}",
            "--connections", str(conns), "--streams", str(p.h2_streams),
            "--body-size", str(body), "--samples",
        ]  # fmt: skip
        if h2:
            cmd.append("--http2")
        pids = self.pids()
        before = procstat.sample_cpu(pids.values())
        res = self.in_client(cmd, timeout=p.duration + 60)
        after = procstat.sample_cpu(pids.values())
        if res.returncode != 0:
            raise LabError(f"loadgen {proto} {body} B @{rate:g}: {res.stderr.strip()[-400:]}")
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        cpu = procstat.cpu_seconds(before, after)
        out["mesh_cpu_s"] = round(cpu, 3)
        out["mesh_cpu_by_process_s"] = {
            label: round(
                procstat.cpu_seconds(
                    procstat.CpuSample({p: before.ticks.get(p, 0)}),
                    procstat.CpuSample({p: after.ticks.get(p, 0)}),
                ),
                3,
            )
            for label, p in pids.items()
            if p in before.ticks and p in after.ticks
        }
        per = procstat.per_thousand(cpu, int(out.get("completed", 0)))
        out["cpu_per_1k_requests"] = None if per is None else round(per, 4)
        return out

    def bulk(self, mib: int) -> dict[str, Any]:
        res = self.in_client(
            ["python", "-m", "benchmarks.bulk", self.url, "--mib", str(mib)], timeout=300
        )
        try:
            out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {"ok": False, "error": (res.stderr or res.stdout).strip()[-300:]}
        return out

    def enrol_times(self, pods_per_node: int, reps: int) -> list[float]:
        """ms for ztunnel to enrol a pod: the enrolment request (as the CNI plugin sends it)
        until its reply, which comes once the in-pod listeners are open and BPF is attached.
        Idle pods are taken out and enrolled again, `reps` times each."""
        names = [n for n, _ in M.filler_pods(pods_per_node, waypoint=self.mode.waypoint)] or [
            "client"
        ]
        out: list[float] = []
        for _ in range(reps):
            for name in names:
                info = self.lab.state.pods[f"{M.NAMESPACE}/{name}"]
                sock = self.lab.paths.enrol_socket(str(info["node"]))
                enrol_request(sock, {"op": "del", "namespace": M.NAMESPACE, "name": name})
                msg = {
                    "op": "add",
                    "namespace": M.NAMESPACE,
                    "name": name,
                    "netns": netns_path(str(info["netns"])),
                    "cgroup": str(info["cgroup"]),
                }
                t0 = time.perf_counter()
                reply = enrol_request(sock, msg)
                dt = (time.perf_counter() - t0) * 1000
                if not reply.get("ok") or not reply.get("enrolled"):
                    raise LabError(f"re-enrolling {name}: {reply}")
                out.append(round(dt, 2))
        return out

    def ready_pods(self, pods_per_node: int) -> list[str]:
        """The pods whose start is timed: idle pods on the client's node (so the first request
        crosses to the server's node, like the latency runs), at most READY_PODS of them."""
        names = [
            n
            for n, node in M.filler_pods(pods_per_node, waypoint=self.mode.waypoint)
            if node == M.NODES[0]
        ]
        return names[:READY_PODS] or ["client"]

    def pod_ready(self, pods_per_node: int, reps: int) -> dict[str, Any]:
        """Pod ready, the same span in every mode: from the pod's network being ready (the
        bridge's CNI ADD has long returned) to its first request answered through the mesh.
        Ambient: the span runs the real `ambientmesh-cni` ADD (the plugin's own start
        included) and ends at the prober's first answer through ztunnel. Sidecar: it runs the
        capture rules and Envoy's start, and ends at the first answer through Envoy. The end
        is marked by a prober started in the pod beforehand (`benchmarks.prober`), on
        CLOCK_MONOTONIC, which is the same clock in every process of the machine."""
        names = self.ready_pods(pods_per_node)
        url = urlsplit(self.url)
        samples: list[float] = []
        answers: list[float] = []
        plugin: list[float] = []
        for _ in range(reps):
            for name in names:
                answer, cni_ms = self._one_pod_ready(name, str(url.hostname), url.port or 80)
                # ztunnel may answer before the plugin has exited, but a runtime starts the
                # pod's app only once the whole chain's ADD has returned: the pod is ready at
                # the later of the two
                samples.append(max(answer, cni_ms or 0.0))
                answers.append(answer)
                if cni_ms is not None:
                    plugin.append(cni_ms)
        out: dict[str, Any] = {
            "what": READY_SPAN[0]
            if self.mode.ambient
            else READY_SPAN[2]
            if self.mode.node_envoy
            else READY_SPAN[1],
            "pods_per_node": pods_per_node,
            "samples_ms": samples,
            "median_ms": round(report.median(samples), 2),
        }
        if plugin:
            # the parts: which of the two ended each sample
            out["cni_add_ms"] = plugin
            out["first_answer_ms"] = answers
        return out

    def _one_pod_ready(self, name: str, host: str, port: int) -> tuple[float, float | None]:
        """One sample: (ms to the first answer through the mesh, the CNI ADD's own ms or None),
        both from the span's start."""
        key = f"{M.NAMESPACE}/{name}"
        info = self.lab.state.pods[key]
        sa = "idle" if name.startswith("idle-") else name
        envoy_argv: list[str] = []
        if self.mode.ambient:
            self.lab.cni_mesh_plugin("DEL", M.NAMESPACE, name)
        elif self.sidecars is not None:
            self.sidecars.eject(M.NAMESPACE, name)
            envoy_argv = self.sidecars.prepare(M.NAMESPACE, name, sa)
        elif self.node_envoys is not None:
            self.node_envoys.remove_pod(key)
        else:
            raise LabError(f"mode {self.mode.name} has no pod-ready span")
        cmd = ["python", "-m", "benchmarks.prober", host, str(port)]
        if self.mode.ambient or self.mode.node_envoy:
            # without the capture the same request reaches the server directly
            cmd.append("--captured-only")
        prober = subprocess.Popen(
            podexec_argv(str(info["netns"]), str(info["cgroup"]), cmd),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=child_env(),
        )  # fmt: skip
        try:
            assert prober.stdin is not None and prober.stdout is not None
            if prober.stdout.readline().strip() != "ready":
                _, err = prober.communicate(timeout=10)
                raise LabError(f"prober in {key} did not start: {err.strip()[-300:]}")
            cni_ms: float | None = None
            t0 = time.monotonic_ns()
            prober.stdin.write("go\n")
            prober.stdin.flush()
            if self.mode.ambient:
                reply = self.lab.cni_mesh_plugin("ADD", M.NAMESPACE, name)
                cni_ms = (time.monotonic_ns() - t0) / 1e6
                if not isinstance(reply, dict):
                    raise LabError(f"ambientmesh-cni ADD for {key}: {reply!r}")
            elif self.sidecars is not None:
                self.sidecars.start_measured(M.NAMESPACE, name, envoy_argv)
            elif self.node_envoys is not None:
                self.node_envoys.add_pod(key)
            out, err = prober.communicate(timeout=60)
        except BaseException:
            prober.kill()
            prober.wait()
            raise
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"ok": False}
        if not res.get("ok"):
            raise LabError(f"pod ready in {key}: no answer through the mesh: {out} {err[-300:]}")
        answer = (int(res["answered_ns"]) - t0) / 1e6
        return round(answer, 2), None if cni_ms is None else round(cni_ms, 2)

    def verify(self) -> dict[str, Any]:
        """Evidence from the mesh's own telemetry that the traffic took the mesh's path."""
        if self.mode.sidecar and self.sidecars is not None:
            c = self.sidecars.admin_stats(f"{M.NAMESPACE}/client")
            s = self.sidecars.admin_stats(f"{M.NAMESPACE}/server")
            hs_c = c.get("cluster.outbound_mtls.ssl.handshake", 0)
            hs_s = s.get(f"listener.0.0.0.0_{sidecar.INBOUND_PORT}.ssl.handshake", 0)
            rq = s.get("http.inbound.downstream_rq_total", 0)
            return {
                "ok": hs_c > 0 and hs_s > 0 and rq > 0,
                "client_sidecar_mtls_handshakes": hs_c,
                "server_sidecar_mtls_handshakes": hs_s,
                "server_sidecar_requests": rq,
            }
        if self.mode.node_envoy and self.node_envoys is not None:
            return node_envoy_evidence(self.node_envoys)
        if self.mode.mesh:
            from meshctl.lab import observe

            n = 0.0
            for node in self.lab.state.nodes:
                with contextlib.suppress(OSError, LabError):
                    n += observe.connections(
                        observe.parse_metrics(self.lab.ztunnel_metrics(node)),
                        security="mutual_tls",
                        reporter="destination",
                    )
            out: dict[str, Any] = {"ok": n > 0, "ztunnel_mtls_connections": n}
            if self.mode.same_node:
                ev = M.same_node_evidence(self.lab, self.mode)
                took_path = bool(ev.pop("same_node_ok"))
                out.update(ev, ok=n > 0 and took_path)
            if self.mode.envoy_waypoint:
                st = M.envoy_waypoint_stats(self.lab)
                connects = st.get(f"http.{envoy_waypoint.IN_STATS}.downstream_rq_total", 0)
                routed = st.get(f"http.{envoy_waypoint.ROUTE_STATS}.downstream_rq_total", 0)
                out.update(envoy_waypoint_connects=connects, envoy_waypoint_requests=routed)
                v1, v2 = (
                    st.get(f"cluster.svc|server-{v}.upstream_rq_total", 0) for v, _ in M.SPLIT
                )
                if v1 + v2:  # the HTTPRoute's 80/20 really applied
                    out["envoy_waypoint_v2_share"] = round(v2 / (v1 + v2), 3)
                out["ok"] = out["ok"] and connects > 0 and routed > 0
            return out
        return {"ok": True}


def node_envoy_evidence(ne: NodeEnvoys) -> dict[str, Any]:
    """The client node's Envoy tunnelled (tcp_proxy connections, mTLS handshakes on its HBONE
    clusters) and the server node's Envoy terminated CONNECTs from it."""
    c = ne.stats(M.NODES[0])
    s = ne.stats(M.NODES[1])
    tunnelled = c.get(f"tcp.{node_envoy.OUT_STATS}.downstream_cx_total", 0)
    handshakes = sum(v for k, v in c.items() if k.startswith("cluster.out|")
                     and k.endswith(".ssl.handshake"))  # fmt: skip
    connects = s.get(f"http.{node_envoy.IN_STATS}.downstream_rq_total", 0)
    return {
        "ok": tunnelled > 0 and handshakes > 0 and connects > 0,
        "client_node_envoy_tunnelled_connections": tunnelled,
        "client_node_envoy_mtls_handshakes": handshakes,
        "server_node_envoy_connects": connects,
    }


# -- one mode --------------------------------------------------------------------------------


@dataclass(slots=True)
class Roots:
    name: str
    state_root: Path = STATE_ROOT
    cgroup_root: Path = CGROUP_ROOT
    pin_root: Path = PIN_ROOT
    verbose: bool = False
    counter: int = 0

    def lab(self, mode: M.Mode, say: Progress) -> Lab:
        self.counter += 1
        paths = LabPaths(
            f"{self.name}{self.counter}",
            state_root=self.state_root,
            cgroup_root=self.cgroup_root,
            pin_root=self.pin_root,
        )
        out = (lambda m: say(f"  lab: {m}")) if self.verbose else (lambda _m: None)
        return Lab(paths, mesh=mode.mesh, out=out, ztunnel_args=mode.ztunnel_args)


@contextlib.contextmanager
def lab_up(roots: Roots, mode: M.Mode, pods_per_node: int, say: Progress) -> Iterator[Bench]:
    """A lab of `mode` at `pods_per_node`, with the mode's proxies made but not started
    (`start_proxies`), torn down (proxies first) however the block ends."""
    lab = roots.lab(mode, say)
    sidecars: M.Sidecars | None = None
    node_envoys: NodeEnvoys | None = None
    with tempfile.TemporaryDirectory(prefix="ambientmesh-bench-") as tmp:
        f = Path(tmp) / "manifest.yaml"
        f.write_text(M.dump(M.manifest(mode, pods_per_node, lab, envoy_dir=Path(tmp))))
        t0 = time.monotonic()
        try:
            lab.up(f)
            say(f"[{mode.name}] lab {lab.paths.lab} up ({pods_per_node} pods/node) in "
                f"{time.monotonic() - t0:.1f}s")  # fmt: skip
            if mode.sidecar:
                sidecars = M.Sidecars(lab)
            if mode.envoy_waypoint:
                M.configure_envoy_waypoint(lab, Path(tmp))
            if mode.node_envoy:
                node_envoys = M.node_envoys(lab)
                t1 = time.monotonic()
                node_envoys.load_bpf()
                say(f"[{mode.name}] capture loaded and attached to the node proxies' cgroups "
                    f"in {time.monotonic() - t1:.1f}s")  # fmt: skip
            yield Bench(mode, lab, say, sidecars, node_envoys)
        finally:
            if sidecars is not None:
                sidecars.stop()
            if node_envoys is not None:
                node_envoys.stop()
            problems = lab.down(quiet=True)
            if problems:
                say(f"[{mode.name}] WARNING: lab down: {'; '.join(problems)}")


def run_line(r: dict[str, Any], *, mesh: bool) -> str:
    """One progress line for a finished latency run."""
    rate = float(r["target_rate"])
    lat = r["latency_ms"]
    line = (
        f"{r['protocol']:8} {r['body_size']:>5} B @{'max' if rate == 0 else f'{rate:g}':>5}: "
        f"{r['achieved_rate']:>7.0f} rps  p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
        f"p99.9 {lat['p99.9']:.2f} ms  errors {r['errors']}"
    )
    if mesh:
        line += f"  mesh CPU {r['mesh_cpu_s']:.2f}s"
    return line


def latency_runs(b: Bench, p: Preset, round_: int) -> list[dict[str, Any]]:
    """Every latency point of the preset once, in this lab. Only the reference point keeps its
    samples (for the distribution chart); the others would only bloat results.json."""
    runs: list[dict[str, Any]] = []
    tag = f" (repeat {round_}/{p.repeats})" if p.repeats > 1 else ""
    for proto, body, rate in p.runs:
        r = b.loadgen(proto, body, rate, p)
        runs.append(r)
        b.say(f"[{b.mode.name}]{tag} {run_line(r, mesh=b.mode.proxied)}")
        keep = proto == H1 and body == 0 and rate == p.reference_rate
        if not keep:
            r.pop("samples_ms", None)
    return runs


def repeat_mode(
    mode: M.Mode, p: Preset, roots: Roots, say: Progress, result: dict[str, Any], round_: int
) -> None:
    """One more pass over the latency points in a fresh lab (the same bring-up as the first
    pass), so a repeat also samples lab-to-lab variance, not just run-to-run. A failure marks
    the mode failed, like a failure in the first pass."""
    d0 = p.densities[0]
    try:
        with lab_up(roots, mode, d0, say) as b:
            start_proxies(b, d0)
            if mode.waypoint:
                M.wait_waypoint(b.lab, envoy=mode.envoy_waypoint)
            b.wait_app()
            result["rounds"].append(latency_runs(b, p, round_))
    except (LabError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        say(f"[{mode.name}] FAILED (repeat {round_}): {exc}")
        result["status"] = "failed"
        result["reason"] = f"repeat {round_}: {type(exc).__name__}: {exc}"


def start_proxies(b: Bench, pods_per_node: int, skip: Sequence[str] = ()) -> None:
    """The mode's own proxies (sidecars or node Envoys), for every pod but those in `skip`."""
    if b.sidecars is not None:
        start_sidecars(b.sidecars, pods_per_node, skip)
    if b.node_envoys is not None:
        pods = {f"{M.NAMESPACE}/{n}": "idle" if n.startswith("idle-") else n
                for n in M.pod_names(pods_per_node)}  # fmt: skip
        b.node_envoys.start([M.server_route(b.lab)], pods,
                            skip=tuple(f"{M.NAMESPACE}/{n}" for n in skip))  # fmt: skip


def start_sidecars(sidecars: M.Sidecars, pods_per_node: int, skip: Sequence[str] = ()) -> None:
    """Every pod's sidecar (but those in `skip`, whose start is timed later), started together
    and then waited for, as a node starting its pods would."""
    names = [n for n in M.pod_names(pods_per_node) if n not in skip]
    for name in names:
        sidecars.inject(M.NAMESPACE, name, "idle" if name.startswith("idle-") else name,
                        wait=False)  # fmt: skip
    for name in names:
        sidecars.wait_ready(f"{M.NAMESPACE}/{name}")


def finish_mode(result: dict[str, Any]) -> None:
    """Latency points merged over the repeats; CPU aggregate over all of them."""
    rounds = result.pop("rounds", None)
    if not rounds:
        return
    runs = report.merge_repeats(rounds)  # every repeat's own figures stay in run["repeats"]
    result["runs"] = runs
    if "cpu" in result:
        cpu = sum(float(r.get("mesh_cpu_s", 0)) for r in runs)
        reqs = sum(int(r["completed"]) for r in runs)
        per = procstat.per_thousand(cpu, reqs)
        result["cpu"].update(
            seconds=round(cpu, 3),
            requests=reqs,
            per_1k_requests=None if per is None else round(per, 4),
        )


def run_mode(mode: M.Mode, p: Preset, roots: Roots, say: Progress) -> dict[str, Any]:
    result: dict[str, Any] = {"title": mode.title, "description": mode.description}
    reason = M.unavailable(mode)
    if reason:
        say(f"[{mode.name}] skipped: {reason}")
        return {**result, "status": "skipped", "reason": reason}
    try:
        _measure(mode, p, roots, say, result)
        result["status"] = "ok"
    except (LabError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        say(f"[{mode.name}] FAILED: {exc}")
        result["status"] = "failed"
        result["reason"] = f"{type(exc).__name__}: {exc}"
    return result


def _measure(mode: M.Mode, p: Preset, roots: Roots, say: Progress, result: dict[str, Any]) -> None:
    d0 = p.densities[0]
    with lab_up(roots, mode, d0, say) as b:
        start_proxies(b, d0, skip=b.ready_pods(d0))
        if mode.waypoint:
            M.wait_waypoint(b.lab, envoy=mode.envoy_waypoint)
        if mode.timed_ready:
            # the timed pods last, once the rest of the lab is up (for a sidecar: after
            # the server's Envoy, which the first answer passes through)
            b.wait_app()
            ready = b.pod_ready(d0, p.enrol_reps)
            result["startup"] = ready
            result["startup_by_density"] = {str(d0): ready}
            say(f"[{mode.name}] pod ready at {d0} pods/node: "
                f"{report.distribution(ready['samples_ms'])}")  # fmt: skip
        reply = b.wait_app()
        result["server_saw_peer"] = reply.get("peer")
        if mode.ambient:
            times = b.enrol_times(d0, p.enrol_reps)
            result["enrolment"] = {
                "what": "ambient: enrolment request until ztunnel's reply (a part of pod ready)",
                "samples_ms": times,
                "median_ms": round(report.median(times), 2),
            }
            say(f"[{mode.name}] enrolment: median {report.median(times):.1f} ms "
                f"over {len(times)}")  # fmt: skip
            b.wait_app()
        memory: dict[str, Any] = {}
        if mode.proxied:
            memory[str(d0)] = b.memory(d0)
        runs = latency_runs(b, p, round_=1)
        result["rounds"] = [runs]
        if mode.proxied:
            cpu = sum(float(r["mesh_cpu_s"]) for r in runs)
            reqs = sum(int(r["completed"]) for r in runs)
            per = procstat.per_thousand(cpu, reqs)
            result["cpu"] = {
                "what": "aggregate over every latency run (weighted to max-rate runs); the"
                " headline is each run's own cpu_per_1k_requests at the reference rate",
                "seconds": round(cpu, 3),
                "requests": reqs,
                "per_1k_requests": None if per is None else round(per, 4),
            }
        if p.bulk_mib > 0:
            bulk = b.bulk(p.bulk_mib)
            result["bulk"] = bulk
            got = f"{bulk['mib_per_s']:.1f} MiB/s" if bulk.get("ok") else f"FAILED {bulk}"
            say(f"[{mode.name}] bulk {p.bulk_mib} MiB: {got}")
        if mode.proxied:
            after = b.memory(d0)
            memory[str(d0)]["after_load_pss_kib"] = after["pss_kib"]
            memory[str(d0)]["after_load_rss_kib"] = after["rss_kib"]
        try:
            v = b.verify()
        except (LabError, OSError, ValueError) as exc:
            v = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["verified"] = v
        if not v.get("ok"):
            say(f"[{mode.name}] WARNING: the mesh's telemetry does not show the traffic: {v}")
            result["title"] = mode.title + " (UNVERIFIED)"
    for d in p.densities[1:]:
        if not (mode.proxied):
            break
        with lab_up(roots, mode, d, say) as b:
            start_proxies(b, d, skip=b.ready_pods(d))
            if mode.waypoint:
                M.wait_waypoint(b.lab, envoy=mode.envoy_waypoint)
            if mode.timed_ready:
                b.wait_app()
                ready = b.pod_ready(d, p.enrol_reps)
                result.setdefault("startup_by_density", {})[str(d)] = ready
                say(f"[{mode.name}] pod ready at {d} pods/node: "
                    f"{report.distribution(ready['samples_ms'])}")  # fmt: skip
            b.wait_app()
            memory[str(d)] = b.memory(d)
            say(f"[{mode.name}] {d} pods/node: mesh PSS "
                f"{memory[str(d)]['pss_kib'] / 1024:.1f} MiB, RSS "
                f"{memory[str(d)]['rss_kib'] / 1024:.1f} MiB")  # fmt: skip
    if memory:
        result["memory"] = memory


# -- the run ---------------------------------------------------------------------------------


def commit_of(repo: Path) -> str:
    """HEAD of the tree that ran, with "-dirty" when tracked files differ from it (untracked
    ones, such as this run's own output directory, do not count): a reader rerunning the
    benchmark needs to know whether the code that made the figures is the commit named."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if changed else "")


def command_line() -> str:
    """The exact command as typed (interpreter flags and `-m` included), shell-quoted."""
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kib"] = int(line.split()[1])
    info["commit"] = commit_of(REPO_ROOT)
    env = M.envoy_binary()
    if env:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            v = subprocess.run([env, "--version"], capture_output=True, text=True, timeout=20)
            info["envoy"] = v.stdout.strip().split("version:")[-1].strip()
    return info


def parse_modes(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in M.MODES]
    if bad or not names:
        raise UsageError(f"--modes {text!r}: unknown {bad or 'none given'}; choose from "
                         f"{', '.join(M.MODES)}")  # fmt: skip
    return names


def parse_floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not out or any(x < 0 for x in out):
        raise UsageError(f"{flag} {text!r}: expected numbers >= 0")
    return out


def preset_from(args: argparse.Namespace) -> Preset:
    p = quick_preset() if args.quick else full_preset()
    if args.duration is not None:
        if args.duration <= 0:
            raise UsageError(f"--duration {args.duration}: must be > 0")
        p = replace(p, duration=args.duration)
    if args.rates is not None:
        rates = parse_floats("--rates", args.rates)
        combos = list(dict.fromkeys((proto, body) for proto, body, _ in p.runs))
        p = replace(p, runs=tuple((proto, body, r) for proto, body in combos for r in rates))
        p = replace(p, reference_rate=next((r for r in rates if r > 0), 0.0))
    if args.densities is not None:
        dens = tuple(int(x) for x in parse_floats("--densities", args.densities))
        if any(d < 1 for d in dens):
            raise UsageError(f"--densities {args.densities!r}: pods per node must be >= 1")
        p = replace(p, densities=dens)
    if args.bulk_mib is not None:
        p = replace(p, bulk_mib=args.bulk_mib)
    if args.repeats is not None:
        if not 1 <= args.repeats <= 50:
            raise UsageError(f"--repeats {args.repeats}: must be 1..50")
        p = replace(p, repeats=args.repeats)
    return p


def guest_part(
    args: argparse.Namespace, names: Sequence[str], out: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The ambient-ktls mode's stand-in where the host kernel lacks kTLS (benchmarks.ktls_guest):
    run when that mode is asked for, unless --no-guest."""
    if args.no_guest:
        return {"status": "skipped", "reason": "--no-guest"}
    if "ambient-ktls" not in names:
        return {"status": "skipped", "reason": "ambient-ktls is not among --modes"}
    return ktls_guest.host_run(out, bool(args.quick), say)


def cmd_bench(args: argparse.Namespace) -> int:
    names = parse_modes(args.modes)
    p = preset_from(args)
    if os.geteuid() != 0:
        raise UsageError("the benchmark runs on the lab, which needs root")
    if not (len(args.name) <= 12 and args.name.isalnum() and args.name[:1].isalpha()):
        raise UsageError(f"--name {args.name!r}: 1-12 lowercase letters/digits")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    say = Progress()

    def interrupt(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    roots = Roots(args.name.lower(), Path(args.state_root), Path(args.cgroup_root),
                  Path(args.pin_root), verbose=args.verbose)  # fmt: skip
    results: dict[str, Any] = {
        "meta": {
            "started": stamp,
            "quick": bool(args.quick),
            "command": command_line(),
            "cwd": os.getcwd(),
            "machine": platform.node(),
            "host": machine(),
            "preset": {
                "runs": [list(r) for r in p.runs],
                "duration_s": p.duration,
                "bulk_mib": p.bulk_mib,
                "densities": list(p.densities),
                "reference_rate": p.reference_rate,
                "connections": p.connections,
                "h2_connections": p.h2_connections,
                "h2_streams": p.h2_streams,
                "envoy_concurrency": M.ENVOY_CONCURRENCY,
                "repeats": p.repeats,
            },
            "repeats": p.repeats,
        },
        "modes": {},
    }
    say(f"benchmark: modes {', '.join(names)}; {len(p.runs)} latency runs of "
        f"{p.duration:g}s each, x{p.repeats} interleaved; densities {p.densities}; "
        f"output {out}")  # fmt: skip
    try:
        for name in names:
            results["modes"][name] = run_mode(M.MODES[name], p, roots, say)
            (out / "results.json").write_text(json.dumps(results, indent=1))
        # repeats interleaved across modes (A B C, A B C, ...), so a slow spell of the shared
        # machine lands on every mode rather than on whichever happened to run then
        for rnd in range(2, p.repeats + 1):
            for name in names:
                if results["modes"][name].get("status") == "ok":
                    repeat_mode(M.MODES[name], p, roots, say, results["modes"][name], rnd)
                    (out / "results.json").write_text(json.dumps(results, indent=1))
        for name in names:
            finish_mode(results["modes"][name])
        (out / "results.json").write_text(json.dumps(results, indent=1))
        g = results["ktls_guest"] = guest_part(args, names, out, say)
        say(f"kTLS guest: {g['status']}" + (f" ({g['reason']})" if g.get("reason") else ""))
    except KeyboardInterrupt:
        say("interrupted; labs torn down, partial results kept")
        for name in results["modes"]:
            finish_mode(results["modes"][name])
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return 130
    results["meta"]["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = report.render(results, reference_rate=p.reference_rate, densities=p.densities)
    (out / "report.md").write_text(md)
    try:
        from benchmarks import charts

        pngs = charts.render_all(results, out, rate=p.reference_rate, densities=p.densities)
        say(f"charts: {', '.join(str(x) for x in pngs)}")
    except ImportError as exc:
        say(f"no charts ({exc}); pip install matplotlib")
    print()
    print(md)
    failed = [n for n, m in results["modes"].items() if m["status"] == "failed"]
    return 1 if failed else 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="no mesh, sidecars, ambient and Envoy peers compared on the lab (JSON, md, charts)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs (a few minutes)")
    p.add_argument("--out", help="output directory (default ./bench-<UTC time>)")
    p.add_argument(
        "--modes",
        default=",".join(M.MODES),
        help=f"comma-separated, from: {', '.join(M.MODES)} (default all)",
    )
    p.add_argument("--duration", type=float, help="seconds per latency run (overrides preset)")
    p.add_argument("--rates", help="comma-separated req/s, 0 = maximum (overrides preset)")
    p.add_argument("--densities", help="comma-separated pods per node for memory (e.g. 2,20)")
    p.add_argument("--bulk-mib", type=int, help="bulk stream size, 0 = skip")
    p.add_argument(
        "--repeats",
        type=int,
        help="runs of each latency point, interleaved across modes (default 3; --quick 1)",
    )
    p.add_argument(
        "--no-guest",
        action="store_true",
        help="skip the kTLS part in a QEMU guest kernel (run where the host kernel lacks kTLS)",
    )
    p.add_argument("--verbose", action="store_true", help="show the lab's own progress lines")
    p.add_argument("--name", default="bench", help="lab name prefix (labs are <name><n>)")
    p.add_argument("--state-root", default=str(STATE_ROOT), help=argparse.SUPPRESS)
    p.add_argument("--cgroup-root", default=str(CGROUP_ROOT), help=argparse.SUPPRESS)
    p.add_argument("--pin-root", default=str(PIN_ROOT), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
