"""`python -m benchmarks.fuzz --seconds N`: every fuzz target under atheris for N seconds each,
then inputs tried, crashes and hangs per target.

Each target runs in a child process (`benchmarks.fuzz.one`) at the lowest CPU priority,
starting from the seed corpus (`benchmarks.fuzz.seeds`). libFuzzer stops at the first crash
or hang; the runner keeps the input (`--artifacts`), counts it, and starts the target again
for the rest of its time, so one finding does not end the run. A benchmark, not a test: it
prints figures and exits 0 whatever they are.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fuzz.seeds import SEEDS
from benchmarks.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
HANG_TIMEOUT = 20  # libFuzzer's per-input limit; the targets' own hang deadline is shorter
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"Done (\d+) runs")
_PULSE = re.compile(r"^#(\d+)\s", re.M)


@dataclass
class Result:
    target: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    runs: int = 0
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)


def _executed(err: str) -> int:
    for rx in (_EXECUTED, _DONE):
        m = rx.search(err)
        if m:
            return int(m.group(1))
    pulses = _PULSE.findall(err)
    return int(pulses[-1]) if pulses else 0


_EXC_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Hang|Warning)\b.*)$", re.M)


def signature(stderr: str) -> str:
    """The exception a crash ended in (its last line), so repeats of one bug group together."""
    found = _EXC_LINE.findall(stderr[stderr.rfind("Traceback") :])
    if found:
        return re.sub(r"(position|byte 0x)\s*\w+", r"\1 _", found[-1])[:300]
    return stderr.strip().splitlines()[-1][:300] if stderr.strip() else "(no output)"


def fuzz_one(name: str, seconds: float, work: Path, artifacts: Path, nice: int) -> Result:
    corpus = work / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[name]()):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    res = Result(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    while (left := deadline - time.monotonic()) > 1:
        res.runs += 1
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.fuzz.one",
            name,
            f"-max_total_time={int(left)}",
            f"-timeout={HANG_TIMEOUT}",
            "-rss_limit_mb=1024",
            "-max_len=16384",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-",
            str(corpus),
        ]
        proc = subprocess.run(
            ["nice", "-n", str(nice), *cmd],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=left + HANG_TIMEOUT * 3,
            check=False,
        )
        res.inputs += _executed(proc.stderr)
        if proc.returncode == 0:
            continue
        written = re.findall(r"Test unit written to (\S+)", proc.stderr)
        err = proc.stderr
        hang = "ALARM" in err or "targets.Hang" in err or "-timeout-" in "".join(written)
        if hang:
            res.hangs += 1
        else:
            res.crashes += 1
        res.findings.append(f"{signature(err)}\n  e.g. {written[0] if written else '(none)'}")
    res.seconds = time.monotonic() - start
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__)
    ap.add_argument("--seconds", type=float, default=60, help="per target (default 60)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (default 1)")
    ap.add_argument("--nice", type=int, default=19)
    ap.add_argument("--artifacts", type=Path, default=None, help="keep crashing inputs here")
    args = ap.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    for n in names:
        if n not in TARGETS:
            ap.error(f"unknown target {n!r}; known: {', '.join(TARGETS)}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris); nothing to run", file=sys.stderr)
        return 0
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp)
        artifacts = args.artifacts or work / "artifacts"
        if args.jobs <= 1:
            for n in names:
                results.append(fuzz_one(n, args.seconds, work, artifacts, args.nice))
                _print_row(results[-1])
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(args.jobs) as pool:
                futs = [
                    pool.submit(fuzz_one, n, args.seconds, work, artifacts, args.nice)
                    for n in names
                ]
                for f in futs:
                    results.append(f.result())
                    _print_row(results[-1])
    print()
    print(f"{'target':8} {'inputs':>12} {'exec/s':>8} {'crashes':>8} {'hangs':>6} {'restarts':>9}")
    for r in results:
        rate = r.inputs / r.seconds if r.seconds else 0.0
        print(
            f"{r.target:8} {r.inputs:>12,} {rate:>8,.0f} {r.crashes:>8} {r.hangs:>6} "
            f"{r.runs - 1:>9}"
        )
    total = sum(r.inputs for r in results)
    print(
        f"{'total':8} {total:>12,} {'':>8} {sum(r.crashes for r in results):>8} "
        f"{sum(r.hangs for r in results):>6}"
    )
    for r in results:
        groups: dict[str, int] = {}
        for finding in r.findings:
            groups[finding] = groups.get(finding, 0) + 1
        for finding, n in groups.items():
            print(f"\n{r.target}: {n}x {finding}")
    return 0


def _print_row(r: Result) -> None:
    print(
        f"{r.target}: {r.inputs:,} inputs in {r.seconds:.0f}s, {r.crashes} crashes, "
        f"{r.hangs} hangs",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
