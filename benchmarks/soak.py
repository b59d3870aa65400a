"""`python -m benchmarks.soak --minutes M`: a churn soak through two ztunnels and a waypoint.

Connections are opened and closed continuously (one HTTP/1.1 request each, `Connection:
close`) by `--concurrency` workers per path, on two paths at once: the L4 service (ztunnel n1
→ HBONE → ztunnel n2 → echo) and the waypoint's service (n1 → waypoint → n2 → echo). Every
minute it prints each proxy's RSS and open fds and the connections completed and failed; at
the end, RSS growth since the warm-up (%) and fds against the warm-up baseline, after the load
stops and the proxies had `--settle` seconds to close what they no longer need.

Memory that grows with every connection and never returns is what a soak exists to find
(istio/ztunnel #1630, #2044). A benchmark, not a test: it prints figures, judges nothing.
Needs root (network namespace, netfilter); see `benchmarks.rig`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from benchmarks.rig import L4_VIP, WP_VIP, Rig, commit, fds, outer, raise_nofile, rss_kib

REQUEST = b"GET /soak HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0


async def one(vip: str, c: Counts, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            r, w = await asyncio.open_connection(vip, 80)
            try:
                w.write(REQUEST)
                data = await r.read(-1)
            finally:
                w.close()
        if data.startswith(b"HTTP/1.1 200"):
            c.ok += 1
        else:
            c.failed += 1
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        c.failed += 1


async def worker(vip: str, c: Counts, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await one(vip, c, 10)


def sample(rig: Rig) -> dict[str, tuple[int, int]]:
    return {p.name: (rss_kib(p.pid), fds(p.pid)) for p in rig.proxies()}


def row(label: str, s: dict[str, tuple[int, int]], paths: dict[str, Counts]) -> str:
    cells = "  ".join(f"{n} {r / 1024:6.1f} MiB {f:4d} fd" for n, (r, f) in s.items())
    done = "  ".join(f"{k} {c.ok:7d} ok {c.failed:4d} failed" for k, c in paths.items())
    return f"{label:>8}  {cells}  |  {done}"


async def inside(a: argparse.Namespace) -> None:
    raise_nofile(65536)
    with Rig(waypoint=True) as rig:
        paths = {"l4": Counts(), "waypoint": Counts()}
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(worker(vip, paths[k], stop))
            for k, vip in (("l4", L4_VIP), ("waypoint", WP_VIP))
            for _ in range(a.concurrency)
        ]
        print(f"soak at commit {commit()}: {a.concurrency} workers per path, "
              f"{a.minutes:g} min after {a.warmup:g} s warm-up", flush=True)  # fmt: skip
        print(row("start", sample(rig), paths), flush=True)
        await asyncio.sleep(a.warmup)
        base = sample(rig)
        print(row("warm", base, paths), flush=True)
        t0 = time.monotonic()
        minute = 0
        peak = dict(base)
        while time.monotonic() - t0 < a.minutes * 60:
            await asyncio.sleep(min(60.0, a.minutes * 60 - (time.monotonic() - t0)))
            minute += 1
            s = sample(rig)
            peak = {n: (max(peak[n][0], s[n][0]), max(peak[n][1], s[n][1])) for n in s}
            print(row(f"min {minute}", s, paths), flush=True)
        stop.set()
        await asyncio.gather(*tasks)
        loaded = sample(rig)
        await asyncio.sleep(a.settle)
        end = sample(rig)
        print(row("settled", end, paths), flush=True)
        print()
        total = sum(c.ok for c in paths.values())
        elapsed = time.monotonic() - t0
        print(f"connections: {total:,} ok in {elapsed / 60:.1f} min "
              f"({total / elapsed:,.0f}/s), failed: "
              + ", ".join(f"{k} {c.failed}" for k, c in paths.items()))  # fmt: skip
        print(f"{'proxy':12} {'RSS warm':>9} {'RSS end':>9} {'growth':>7} {'RSS peak':>9} "
              f"{'fd warm':>7} {'fd loaded':>9} {'fd end':>6}")  # fmt: skip
        for n in base:
            (r0, f0), (r1, f1), (rp, _) = base[n], end[n], peak[n]
            print(f"{n:12} {r0 / 1024:8.1f}M {r1 / 1024:8.1f}M {100 * (r1 - r0) / r0:6.1f}% "
                  f"{rp / 1024:8.1f}M {f0:7d} {loaded[n][1]:9d} {f1:6d}")  # fmt: skip
        for p in rig.proxies():
            if p.popen is not None and p.popen.poll() is not None:
                print(f"{p.name} exited ({p.popen.returncode}) during the soak", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup", type=float, default=60, help="seconds before the baseline")
    p.add_argument("--concurrency", type=int, default=8, help="workers per path")
    p.add_argument("--settle", type=float, default=10, help="seconds after the load stops")
    p.add_argument("--role", choices=["inside"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role is None:
        return outer("benchmarks.soak", argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(inside(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
