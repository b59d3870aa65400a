"""What scripts/ktls-guest.sh runs inside the guest: the kTLS tests, then (with --demo) the
lab demo, then (with --bench) the kTLS benchmark, then (with --bench-json PATH) `meshctl
bench`'s guest part (benchmarks.ktls_guest: figures to PATH), in one interpreter; --no-tests
leaves the tests out (the bench's boot), --quick shortens the guest part. Under QEMU's emulation
a Python start with our imports costs about a minute, so one process does all.

The guest is also the one machine state no earlier run has touched: nothing is mounted at
/sys/fs/bpf, cgroup v2 sits at /sys/fs/cgroup (unified, where this host is hybrid), and the
kernel has kTLS. So the demo there proves the README's main job on a fresh machine, with
kTLS on the HBONE connections, and checks that each node says so.

    python -m tests.ktls.guest_main [--no-tests] [--demo] [--bench] [--bench-json PATH [--quick]]
                                    [-- pytest args...]
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from typing import TextIO


class _Tee(io.StringIO):
    """Keep what the demo prints (to check it) while the console still shows it."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self._out = out

    def write(self, s: str) -> int:
        self._out.write(s)
        self._out.flush()
        return super().write(s)


def run_demo() -> int:
    """`meshctl lab demo`, in this interpreter, on a host with no bpffs mounted."""
    from bpf.mounts import BPFFS_ROOT, covering
    from meshctl import cli

    # every lab wait stretched: one Python start takes half a minute under TCG
    os.environ.setdefault("MESH_LAB_TIME_SCALE", "30")
    m = covering(BPFFS_ROOT)
    print(f"guest demo: {BPFFS_ROOT} is on {m.fstype if m else 'nothing'} before the demo")
    t0 = time.monotonic()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        rc = cli.main(["lab", "demo", "--name", "guest"])
    out = tee.getvalue()
    print(f"guest demo: exit {rc} in {time.monotonic() - t0:.0f} s")
    problems = []
    if rc != 0 or "all flows as expected" not in out:
        problems.append("the demo did not pass")
    for node in ("node1", "node2"):
        if f"kTLS on {node}: in use" not in out:
            problems.append(f"{node} did not report kTLS in use on its HBONE connections")
    for p in problems:
        print(f"guest demo: FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    bench = "--bench" in argv
    demo = "--demo" in argv
    tests = "--no-tests" not in argv
    quick = "--quick" in argv
    bench_json: str | None = None
    if "--bench-json" in argv:
        i = argv.index("--bench-json")
        if i + 1 >= len(argv):
            print("guest_main: --bench-json needs a path", file=sys.stderr)
            return 2
        bench_json = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    ours = ("--bench", "--demo", "--no-tests", "--quick")
    extra = [a for a in argv if a not in ours]
    rc = 0
    if tests:
        import pytest  # only here: an import costs seconds under TCG

        rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "ktls", "--durations=8",
                              "tests/ktls", *extra]))  # fmt: skip
    if demo:
        rc = run_demo() or rc
    if bench:
        import asyncio

        import uvloop

        from benchmarks import ktls_bench

        args = ktls_bench.build_parser().parse_args([])
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(ktls_bench.amain(args))
        except Exception as exc:  # a broken benchmark must not pass silently
            print(f"ktls_bench failed: {exc!r}", file=sys.stderr)
            rc = rc or 1
    if bench_json is not None:
        from benchmarks import ktls_guest

        rc = ktls_guest.guest_main(bench_json, quick) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
