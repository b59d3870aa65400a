"""CPU time and memory of the mesh's own processes, read from /proc.

The comparison the benchmark exists for is "what does the mesh cost": CPU seconds per 1,000
requests and memory (PSS; RSS alongside) of ztunnels, Envoys and waypoints, never of the apps or
the load generator. So the harness samples exactly those PIDs before and after each run and
charges the difference to that run's completed requests. Parsing is pure (text in, numbers out)
so it is unit-tested on real /proc formats without a process to read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcStatError(ValueError):
    """/proc text that is not what the kernel writes (names the file)."""


def cpu_ticks(stat_text: str) -> int:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat), in clock ticks, all threads.

    The command name (field 2) is in parentheses and may itself contain spaces and ')', so
    fields are counted from the *last* ')'."""
    head, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        raise ProcStatError(f"/proc/<pid>/stat: cannot parse {stat_text[:80]!r}")
    # rest starts at field 3 (state): utime is field 14 -> index 11, stime 15 -> index 12
    try:
        return int(fields[11]) + int(fields[12])
    except ValueError:
        raise ProcStatError(f"/proc/<pid>/stat: utime/stime not numbers in {head[:40]!r}") from None


def rss_kib(status_text: str) -> int:
    """VmRSS of /proc/<pid>/status in KiB (0 for a kernel thread or a zombie, which have none)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ProcStatError(f"/proc/<pid>/status: bad VmRSS line {line!r}")
            return int(parts[1])
    return 0


@dataclass(frozen=True, slots=True)
class Memory:
    """One process's memory in KiB. PSS splits each shared page between the processes that map
    it, so N Envoys sharing one binary are charged for it once in total, not N times; RSS
    charges every process for every page it maps and is kept only for comparison."""

    pss_kib: int
    rss_kib: int


def smaps_rollup(text: str) -> Memory:
    """Pss and Rss of /proc/<pid>/smaps_rollup (zero for a kernel thread, whose file is empty)."""
    got: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in ("Pss", "Rss"):
            continue
        parts = rest.split()
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] != "kB":
            raise ProcStatError(f"/proc/<pid>/smaps_rollup: bad {key} line {line!r}")
        got[key] = int(parts[0])
    if not got:
        return Memory(0, 0)
    if set(got) != {"Pss", "Rss"}:
        raise ProcStatError(f"/proc/<pid>/smaps_rollup: no Pss or no Rss line in {text[:120]!r}")
    return Memory(pss_kib=got["Pss"], rss_kib=got["Rss"])


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Ticks per PID at one instant (PIDs that were gone are absent)."""

    ticks: Mapping[int, int]


def cpu_seconds(before: CpuSample, after: CpuSample, hz: int = CLK_TCK) -> float:
    """CPU seconds the sampled processes spent between two samples. A PID missing from either
    sample (exited or started in between) is left out: its ticks cannot be split correctly."""
    total = 0
    for pid, t in after.ticks.items():
        b = before.ticks.get(pid)
        if b is not None and t >= b:
            total += t - b
    return total / hz


def per_thousand(cpu_s: float, requests: int) -> float | None:
    """CPU seconds per 1,000 completed requests; None when no request completed."""
    if requests <= 0:
        return None
    return cpu_s * 1000.0 / requests


# -- thin I/O --------------------------------------------------------------------------------


def sample_cpu(pids: Iterable[int], proc: Path = Path("/proc")) -> CpuSample:
    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = cpu_ticks((proc / str(pid) / "stat").read_text())
        except (OSError, ProcStatError):
            continue
    return CpuSample(out)


def rss_of(pids: Iterable[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """KiB per PID (PIDs that are gone are left out)."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = rss_kib((proc / str(pid) / "status").read_text())
        except (OSError, ProcStatError):
            continue
    return out


def memory_of(pids: Iterable[int], proc: Path = Path("/proc")) -> dict[int, Memory]:
    """PSS and RSS per PID (PIDs that are gone are left out). PSS depends on who else maps the
    same pages at that instant, so every process of one measurement is read in one pass."""
    out: dict[int, Memory] = {}
    for pid in pids:
        try:
            out[pid] = smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())
        except (OSError, ProcStatError):
            continue
    return out


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """`pid` and every process below it (a pyenv shim or podexec may sit between the PID we
    started and the proxy itself; their threads are all counted in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out
