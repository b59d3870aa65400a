"""What scripts/ktls-guest.sh runs inside the guest: the kTLS tests, then (with --bench) the
kTLS benchmark, in one interpreter. Under QEMU's emulation a Python start with our imports
costs about a minute, so one process does both.

    python -m tests.ktls.guest_main [--bench] [-- pytest args...]
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import pytest

    bench = "--bench" in argv
    extra = [a for a in argv if a != "--bench"]
    rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "ktls", "--durations=8",
                          "tests/ktls", *extra]))  # fmt: skip
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
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
