"""`python -m benchmarks.scale --conns 10000`: N concurrent connections held through one
ztunnel pair; memory per connection.

Every connection goes benchmark → L4_VIP:80 → ztunnel n1 (outbound) → HBONE (pooled, many
streams per TLS connection) → ztunnel n2 → TCP echo, and is proven open by one echoed byte;
then all are held at once. Reported per proxy: RSS and PSS (/proc/<pid>/smaps_rollup) before
and with N held, the difference divided by the connections established, fds; and what is left
once they are closed again. The Rust ztunnel holds 10k at about 38 MB (the issue's figure).

The fd limit of this process (and so of the proxies it starts) is raised to fit N. A benchmark,
not a test: figures only. Needs root (network namespace, netfilter); see `benchmarks.rig`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from benchmarks.rig import L4_VIP, Rig, commit, fds, outer, pss_kib, raise_nofile, rss_kib


async def hold(limit: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        async with asyncio.timeout(limit):
            r, w = await asyncio.open_connection(L4_VIP, 80)
            w.write(b"x")
            await r.readexactly(1)
        return r, w
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


def figures(rig: Rig) -> dict[str, tuple[int, int, int]]:
    return {p.name: (rss_kib(p.pid), pss_kib(p.pid), fds(p.pid)) for p in rig.proxies()}


async def inside(a: argparse.Namespace) -> None:
    limit = raise_nofile(max(65536, 3 * a.conns + 1024))
    with Rig(waypoint=False, echo_mode="tcp") as rig:
        warm = await hold(10)  # the pooled HBONE connection and TLS are up before the baseline
        if warm is None:
            raise SystemExit("scale: the first connection through the mesh failed")
        warm[1].close()
        await asyncio.sleep(1)
        base = figures(rig)
        print(f"scale at commit {commit()}: {a.conns:,} connections, batches of {a.batch}, "
              f"fd limit {limit:,}", flush=True)  # fmt: skip
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        failed = 0
        t0 = time.monotonic()
        while len(held) + failed < a.conns:
            n = min(a.batch, a.conns - len(held) - failed)
            for res in await asyncio.gather(*(hold(30) for _ in range(n))):
                if res is None:
                    failed += 1
                else:
                    held.append(res)
            if (len(held) + failed) % (a.batch * 10) == 0:
                print(f"  {len(held):,} held, {failed:,} failed", flush=True)
        opened = time.monotonic() - t0
        await asyncio.sleep(3)
        full = figures(rig)
        # Are they all still alive? One byte through every tenth.
        probe = held[:: max(1, len(held) // 1000)]
        alive = 0
        for r, w in probe:
            try:
                w.write(b"y")
                async with asyncio.timeout(10):
                    await r.readexactly(1)
                alive += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
        for _, w in held:
            w.close()
        await asyncio.sleep(a.settle)
        after = figures(rig)
        n = len(held)
        print(f"\nheld {n:,} of {a.conns:,} ({failed:,} failed) opened in {opened:.1f} s; "
              f"{alive}/{len(probe)} sampled still echo\n")  # fmt: skip
        print(
            f"{'proxy':12} {'RSS base':>9} {'RSS held':>9} {'PSS base':>9} {'PSS held':>9} "
            f"{'RSS/conn':>9} {'PSS/conn':>9} {'fd held':>8} {'RSS after':>10} {'fd after':>8}"
        )
        for name in base:
            (r0, p0, _f0), (r1, p1, f1), (r2, _p2, f2) = base[name], full[name], after[name]
            per_r = (r1 - r0) / n if n else 0.0
            per_p = (p1 - p0) / n if n else 0.0
            print(f"{name:12} {r0 / 1024:8.1f}M {r1 / 1024:8.1f}M {p0 / 1024:8.1f}M "
                  f"{p1 / 1024:8.1f}M {per_r:7.1f}KiB {per_p:7.1f}KiB {f1:8d} "
                  f"{r2 / 1024:9.1f}M {f2:8d}")  # fmt: skip
        total = sum(full[k][0] for k in full)
        print(f"\nboth ztunnels with {n:,} held: {total / 1024:.1f} MiB RSS")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--batch", type=int, default=200, help="connections opened at once")
    p.add_argument("--settle", type=float, default=10, help="seconds after closing them")
    p.add_argument("--role", choices=["inside"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role is None:
        return outer("benchmarks.scale", argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(inside(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
