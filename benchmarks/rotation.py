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
    reasons: dict[str, int] = field(default_factory=dict)  # why requests failed

    def failed(self, why: BaseException | str) -> None:
        key = why if isinstance(why, str) else type(why).__name__
        self.reasons[key] = self.reasons.get(key, 0) + 1

    late: int = 0  # requests the generator could not start on time (client-side overload)
    queued: float = 0.0  # the longest a held-connection request waited for its turn (s)

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
        if not ok:
            log.failed("new: not 200")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        ok = False
        log.failed(f"new: {type(e).__name__}")
    log.new.append((t, ok))


class Held:
    """One keep-alive connection, requests one at a time from its queue; reopened if it dies
    (the break is recorded: that is what happens to existing connections)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.q: asyncio.Queue[float] = asyncio.Queue()
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.served = 0  # requests answered on the current connection

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
                if not ok:
                    self.log.failed("held: not 200")
            except (
                OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
            ) as e:  # fmt: skip
                ok = False
                self.log.failed(f"held: {type(e).__name__}")
            if ok:
                self.served += 1
            elif self.conn is not None:
                if self.served:  # an established connection broke (not a failed reconnect)
                    self.log.broken.append(self.log.now())
                self.conn[1].close()
                self.conn = None
                self.served = 0
            done = self.log.now()
            self.log.held.append((done, ok))  # when it failed, not when it was queued
            self.log.queued = max(self.log.queued, done - t)
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
          f"; established held connections broken: {len(log.broken)}; longest wait for a "
          f"held connection {log.queued:.2f} s")  # fmt: skip
    if log.reasons:
        print("failures by reason: " + ", ".join(f"{k} {v:,}" for k, v in log.reasons.items()))
    per_s: dict[int, int] = {}
    for t, ok in log.new + log.held:
        if not ok:
            per_s[int(t)] = per_s.get(int(t), 0) + 1
    if per_s:
        print("failures per second (s: n): "
              + " ".join(f"{k}:{v}" for k, v in sorted(per_s.items())))  # fmt: skip


def log_tail(rig: Rig, n: int = 4) -> None:
    """What the proxies complained about: the count and the last few warnings/errors."""
    for p in rig.proxies():
        bad = [ln for ln in rig.log(p.name).splitlines() if " WARNING " in ln or " ERROR " in ln]
        if bad:
            print(f"{p.name}: {len(bad)} warning/error lines, last: ")
            for ln in bad[-n:]:
                print(f"    {ln[:220]}")


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
        log_tail(rig)


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

        bouncer = asyncio.create_task(bounce())
        await load(log, a, a.seconds)
        t_stop, t_down, t_up = await bouncer
        print(f"\n-- restart {name}: {a.seconds:g} s at {a.rate:g} req/s, "
              f"{a.new_share:.0%} on new connections, {a.held} held")  # fmt: skip
        print(f"SIGTERM at {t_stop:.2f} s, exited at {t_down:.2f} s (drain "
              f"{t_down - t_stop:.2f} s), ready again at {t_up:.2f} s "
              f"(down {t_up - t_down:.2f} s)")  # fmt: skip
        summary(log, "restart")
        log_tail(rig)
        # New connections started between the SIGTERM and 5 s after the restart: the first
        # and last that failed bound the fail-closed window (a stream or two may still get
        # through during the drain, so it is not cut at the first success).
        near = [(t, ok) for t, ok in log.new if t_stop <= t <= t_up + 5]
        bad = [t for t, ok in near if not ok]
        if not bad:
            print("no new connection failed around the restart")
        else:
            ok_after = [t for t, ok in log.new if ok and t > max(bad)]
            print(f"new connections failed closed from {min(bad):.2f} s to {max(bad):.2f} s "
                  f"({max(bad) - min(bad):.2f} s; {len(bad):,} of {len(near):,} started then "
                  f"refused); first success after it at "
                  f"{min(ok_after) if ok_after else float('nan'):.2f} s")  # fmt: skip
        others = [t for t, ok in log.new if not ok and not t_stop <= t <= t_up + 5]
        print(f"new connections failed outside that window: {len(others)}")
        if log.broken:
            b = sorted(log.broken)
            print(f"established held connections broken: {len(b)} of {a.held}, "
                  f"between {b[0]:.2f} and {b[-1]:.2f} s")  # fmt: skip
        else:
            print(f"no established held connection broke (of {a.held})")


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
