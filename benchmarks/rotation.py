"""`python -m benchmarks.rotation`: certificate rotation and a ztunnel restart under load.

Open-loop load at `--rate` requests/s through two ztunnel processes (L4 path, HTTP/1.1 echo):
a `--new-share` of the requests each on a new connection (what a restart's fail-closed window
is measured on), the rest on `--held` long-lived keep-alive connections (what happens to
existing connections). Two scenarios, one after the other:

- rotate: every SVID is short-lived (`--ttl` s; ztunnel renews at half life), so each one is
  replaced several times during `--seconds` of load: failed requests are counted, and the
  SVID serials before and after show that rotation really happened;
- restart: after `--seconds / 3` of load, one ztunnel (`--restart n1|n2`) is stopped (SIGTERM,
  its drain) and started again: reported are how long new connections failed (first to last
  failure), whether any request bypassed the mesh (none can: the redirect has nowhere else to
  go), and how many held connections broke and when.

A benchmark, not a test: figures only. Needs root (network namespace, netfilter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

from benchmarks.rig import L4_VIP, Rig, commit, outer, raise_nofile

REQ_CLOSE = b"GET /r HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"
REQ_KEEP = b"GET /k HTTP/1.1\r\nHost: echo\r\n\r\n"


@dataclass
class Log:
    t0: float = field(default_factory=time.monotonic)
    new: list[tuple[float, bool]] = field(default_factory=list)  # (t, ok)
    held: list[tuple[float, bool]] = field(default_factory=list)
    broken: list[float] = field(default_factory=list)  # held connections that died
    late: int = 0  # requests the generator could not start on time (client-side overload)

    def now(self) -> float:
        return time.monotonic() - self.t0


async def read_response(r: asyncio.StreamReader) -> bool:
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await r.readexactly(int(line.split(b":", 1)[1]))
    return True


async def new_conn(log: Log) -> None:
    t = log.now()
    ok = False
    try:
        async with asyncio.timeout(5):
            r, w = await asyncio.open_connection(L4_VIP, 80)
            try:
                w.write(REQ_CLOSE)
                ok = await read_response(r)
            finally:
                w.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        ok = False
    log.new.append((t, ok))


class Held:
    """One keep-alive connection, requests one at a time from its queue; reopened if it dies
    (the break is recorded: that is what happens to existing connections)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.q: asyncio.Queue[float] = asyncio.Queue()
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self) -> None:
        while True:
            t = await self.q.get()
            ok = False
            try:
                async with asyncio.timeout(5):
                    if self.conn is None:
                        self.conn = await asyncio.open_connection(L4_VIP, 80)
                    r, w = self.conn
                    w.write(REQ_KEEP)
                    ok = await read_response(r)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                ok = False
            if not ok and self.conn is not None:
                self.log.broken.append(self.log.now())
                self.conn[1].close()
                self.conn = None
            self.log.held.append((t, ok))
            self.q.task_done()

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()


async def load(log: Log, a: argparse.Namespace, seconds: float) -> None:
    """Open loop: every 10 ms, the requests due by now, whatever the answers do."""
    held = [Held(log) for _ in range(a.held)]
    workers = [asyncio.create_task(h.run()) for h in held]
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    sent = 0.0
    i = 0
    while (el := time.monotonic() - start) < seconds:
        due = a.rate * el - sent
        for _ in range(int(due)):
            sent += 1
            if (sent * a.new_share) % 1 < a.new_share:
                t = asyncio.create_task(new_conn(log))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            else:
                h = held[i % len(held)]
                i += 1
                if h.q.qsize() > 100:
                    log.late += 1
                h.q.put_nowait(log.now())
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    await asyncio.wait_for(asyncio.gather(*(h.q.join() for h in held)), 60)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for h in held:
        h.close()


def summary(log: Log, label: str) -> None:
    def count(xs: list[tuple[float, bool]]) -> str:
        bad = sum(1 for _, ok in xs if not ok)
        return f"{len(xs):,} requests, {bad:,} failed"

    print(f"{label}: new connections: {count(log.new)}; held connections: {count(log.held)}"
          f"; held connections broken: {len(log.broken)}")  # fmt: skip


def serials(rig: Rig) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name in ("ztunnel-n1", "ztunnel-n2"):
        dump = json.loads(rig.admin(name, "/config_dump"))
        out[name] = {f"{c['identity']} {c['serial']}" for c in dump["certificates"]}
    return out


async def rotate(a: argparse.Namespace) -> None:
    with Rig(waypoint=False, cert_ttl=a.ttl) as rig:
        await new_conn(Log())  # pool and SVIDs up
        before = serials(rig)
        log = Log()
        await load(log, a, a.seconds)
        after = serials(rig)
        print(
            f"\n-- rotate: SVID TTL {a.ttl:g} s (renewed at half life), {a.seconds:g} s at "
            f"{a.rate:g} req/s, {a.new_share:.0%} on new connections, {a.held} held"
        )
        for name in before:
            ids = {s.split()[0] for s in after[name]}
            print(f"{name}: {len(ids)} identities; serials replaced: "
                  f"{len(before[name] - after[name])} of {len(before[name])}")  # fmt: skip
        summary(log, "rotate")
        fails = [round(t, 1) for t, ok in log.new + log.held if not ok]
        if fails:
            print(f"failures at (s): {fails[:20]}{' ...' if len(fails) > 20 else ''}")


async def restart(a: argparse.Namespace) -> None:
    with Rig(waypoint=False) as rig:
        await new_conn(Log())
        log = Log()
        name = f"ztunnel-{a.restart}"

        async def bounce() -> tuple[float, float, float]:
            await asyncio.sleep(a.seconds / 3)
            t_stop = log.now()
            await asyncio.to_thread(rig.stop, name)
            t_down = log.now()
            await asyncio.to_thread(rig.start, name)
            return t_stop, t_down, log.now()

        b = asyncio.create_task(bounce())
        await load(log, a, a.seconds)
        t_stop, t_down, t_up = await b
        print(f"\n-- restart {name}: {a.seconds:g} s at {a.rate:g} req/s, "
              f"{a.new_share:.0%} on new connections, {a.held} held")  # fmt: skip
        print(f"SIGTERM at {t_stop:.2f} s, exited at {t_down:.2f} s (drain "
              f"{t_down - t_stop:.2f} s), ready again at {t_up:.2f} s "
              f"(down {t_up - t_down:.2f} s)")  # fmt: skip
        summary(log, "restart")
        bad_new = [t for t, ok in log.new if not ok]
        if bad_new:
            first, last = min(bad_new), max(bad_new)
            after = [t for t, ok in log.new if ok and t > last]
            print(f"new connections failed from {first:.2f} s to {last:.2f} s: a fail-closed "
                  f"window of {last - first:.2f} s ({len(bad_new):,} refused); first success "
                  f"after it at {min(after) if after else float('nan'):.2f} s")  # fmt: skip
        else:
            print("no new connection failed")
        if log.broken:
            print(f"held connections broken at (s): "
                  f"{sorted(round(t, 2) for t in log.broken)}")  # fmt: skip
        bad_held = [t for t, ok in log.held if not ok]
        print(
            f"held-connection requests failed: {len(bad_held)} "
            f"(between {min(bad_held, default=0):.2f} and {max(bad_held, default=0):.2f} s)"
        )


async def inside(a: argparse.Namespace) -> None:
    raise_nofile(65536)
    print(f"rotation/restart at commit {commit()}", flush=True)
    if a.scenario in ("rotate", "both"):
        await rotate(a)
    if a.scenario in ("restart", "both"):
        await restart(a)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.rotation", description=__doc__)
    p.add_argument("--scenario", choices=["rotate", "restart", "both"], default="both")
    p.add_argument("--rate", type=float, default=1000, help="requests/s (open loop)")
    p.add_argument("--new-share", type=float, default=0.3, help="share on new connections")
    p.add_argument("--held", type=int, default=20, help="long-lived keep-alive connections")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--ttl", type=float, default=20, help="SVID lifetime for rotate (s)")
    p.add_argument("--restart", choices=["n1", "n2"], default="n2")
    p.add_argument("--role", choices=["inside"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role is None:
        return outer("benchmarks.rotation", argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(inside(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
