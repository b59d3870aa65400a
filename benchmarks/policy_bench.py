"""What the connect()-time egress check costs: connect() latency in an enrolled pod with
today's redirect-only connect4, with the enforcing one and no policy for the pod, and with an
egress policy of N rules (1,000 by default) in the LPM tables; also how fast a denied connect
fails (EPERM) and how long compiling and installing the N rules takes. Prints figures and
ratios. Root only; not a test: no thresholds.

    python -m benchmarks.policy_bench [--rules 1000] [--connects 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

from bpf.loader import BpfRedirector
from bpf.policy import PolicyMaps, compile_egress
from mesh.config.parse import parse_objects
from mesh.config.snapshot import Snapshot
from mesh.netns import NetNs

POD_IP, DST = "10.77.0.2", "10.77.0.3"
SO_NETNS_COOKIE = 71

# in the proxy's cgroup, in the pod's netns: accept and close, forever
SINK = textwrap.dedent(
    """
    import os, socket, sys
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 15001)); l.listen(4096); print("ready", flush=True)
    while True:
        c, _ = l.accept(); c.close()
    """
)
# in the pod's cgroup: N connects, each timed around connect() alone; prints microseconds
CLIENT = textwrap.dedent(
    """
    import os, socket, sys, time
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    dst, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out = []
    for _ in range(n):
        s = socket.socket()
        t = time.perf_counter_ns()
        try:
            s.connect((dst, port))
        except PermissionError:
            pass
        out.append(time.perf_counter_ns() - t)
        s.close()
    print(" ".join(str(x / 1000) for x in out))
    """
)


def snapshot(rules: int) -> Snapshot:
    """The pod and, with rules > 0, one NetworkPolicy of `rules` egress rules (distinct /24s,
    the last one allowing the benchmark's destination on port 80)."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": "bench",
         "labels": {"app": "app"}}, "spec": {"nodeName": "node1"}, "status": {"podIP": POD_IP}},
    ]  # fmt: skip
    if rules:
        egress: list[dict[str, Any]] = [
            {"to": [{"ipBlock": {"cidr": f"172.{16 + i // 256}.{i % 256}.0/24"}}],
             "ports": [{"port": 443}]}
            for i in range(rules - 1)
        ]  # fmt: skip
        egress.append({"to": [{"ipBlock": {"cidr": f"{DST}/32"}}], "ports": [{"port": 80}]})
        docs.append(
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "bench-out", "namespace": "bench"},
             "spec": {"podSelector": {"matchLabels": {"app": "app"}}, "policyTypes": ["Egress"],
                      "egress": egress}}
        )  # fmt: skip
    return parse_objects(docs)


@contextlib.contextmanager
def pod(enforce: bool) -> Iterator[tuple[str, str, BpfRedirector]]:
    sfx = secrets.token_hex(2)
    ns = f"am-{sfx}-pb"
    root = f"/sys/fs/cgroup/unified/ambientmesh-bench-{sfx}"
    cg, proxy_cg = f"{root}/pod", f"{root}/ztunnel"
    pins = f"/sys/fs/bpf/ambientmesh-bench-{sfx}"
    r = BpfRedirector(pin_root=pins, ztunnel_cgroup=proxy_cg, enforce=enforce)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    sink: subprocess.Popen[str] | None = None
    try:
        for d in (root, cg, proxy_cg):
            os.mkdir(d)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{POD_IP}/32", "dev", "lo"], check=True)
        r.install()
        r.enrol(cg)
        enter = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c"]
        sink = subprocess.Popen([*enter, SINK, proxy_cg], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        yield ns, cg, r
    finally:
        if sink is not None:
            sink.kill()
            sink.wait()
        try:
            r.unenrol(cg)
            r.uninstall()
        finally:
            for d in (cg, proxy_cg, root):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(d)
            subprocess.run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(pins, ignore_errors=True)


def connects(ns: str, cg: str, port: int, n: int) -> list[float]:
    res = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", CLIENT, cg, DST, str(port),
         str(n)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return [float(x) for x in res.stdout.split()]


def install(ns: str, pins: str, snap: Snapshot) -> tuple[float, int]:
    """Compile the pod's egress and write it into the maps; (seconds, entries)."""
    with NetNs(f"/run/netns/{ns}") as netns:
        s = netns.new_socket()
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        s.close()
    t = time.perf_counter()
    pod_ = snap.pod("bench", "app")
    assert pod_ is not None
    eg = compile_egress(snap, pod_)
    maps = PolicyMaps(pins)
    try:
        maps.apply({cookie: eg} if eg else {}, set())
    finally:
        maps.close()
    return time.perf_counter() - t, len(eg.cidrs) if eg else 0


def fmt(us: list[float]) -> str:
    us = sorted(us)
    return (f"median {statistics.median(us):7.1f} us  p90 {us[int(len(us) * 0.9)]:7.1f} us  "
            f"p99 {us[int(len(us) * 0.99)]:7.1f} us")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.policy_bench", description=__doc__)
    p.add_argument("--rules", type=int, default=1000, help="egress rules in the policy")
    p.add_argument("--connects", type=int, default=3000, help="connects per configuration")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("policy_bench: needs root (netns, cgroups, BPF)", file=sys.stderr)
        return 2
    if args.rules < 1 or args.connects < 10:
        p.error("--rules >= 1 and --connects >= 10")
    n, rounds = args.connects, 10
    results: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        # three pods at once, measured in interleaved rounds: the machine's load drifts
        plain = stack.enter_context(pod(enforce=False))
        open_ = stack.enter_context(pod(enforce=True))
        ruled = stack.enter_context(pod(enforce=True))
        install(open_[0], open_[2].pin_root, snapshot(0))
        secs, entries = install(ruled[0], ruled[2].pin_root, snapshot(args.rules))
        print(f"compiled and installed {args.rules} rules ({entries} LPM entries) in {secs:.2f} s")
        runs = {
            "redirect only (before)": (plain, 80),
            "enforcing, pod not isolated": (open_, 80),
            f"enforcing, {args.rules} rules, allowed": (ruled, 80),
            f"enforcing, {args.rules} rules, denied (EPERM)": (ruled, 81),
        }
        for (ns, cg, _), port in runs.values():
            connects(ns, cg, port, n // rounds)  # warm up
        for _ in range(rounds):
            for name, ((ns, cg, _), port) in runs.items():
                results.setdefault(name, []).extend(connects(ns, cg, port, n // rounds))
    base = statistics.median(results["redirect only (before)"])
    print(f"connect() latency in an enrolled pod, {n} connects each, {rounds} interleaved rounds:")
    for name, us in results.items():
        ratio = statistics.median(us) / base
        print(f"  {name:42s} {fmt(us)}  x{ratio:.2f} of redirect-only median")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
