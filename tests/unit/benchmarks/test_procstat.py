"""CPU and memory accounting from /proc text: the 'mesh CPU per 1,000 requests' and 'RSS per
pod' columns are only as right as this parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import procstat

# A real /proc/<pid>/stat line shape; the name holds spaces and a ')' to trip naive splitting.
STAT = (
    "4242 (envoy (main) x) S 1 4242 4242 0 -1 4194560 5120 0 0 0 "
    "731 269 0 0 20 0 9 0 123456 1048576000 16384 18446744073709551615 "
    "1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
)
STATUS = (
    "Name:\tenvoy\nState:\tS (sleeping)\nVmPeak:\t 200000 kB\nVmRSS:\t   65536 kB\nThreads:\t9\n"
)


def test_cpu_ticks_are_utime_plus_stime_after_the_last_paren() -> None:
    assert procstat.cpu_ticks(STAT) == 731 + 269


def test_bad_stat_text_is_an_error_naming_the_file() -> None:
    with pytest.raises(procstat.ProcStatError, match=r"/proc/<pid>/stat"):
        procstat.cpu_ticks("4242 (short) S 1 2")
    with pytest.raises(procstat.ProcStatError):
        procstat.cpu_ticks(STAT.replace(" 731 ", " x "))


def test_rss_from_status_and_zero_for_a_process_without_memory() -> None:
    assert procstat.rss_kib(STATUS) == 65536
    assert procstat.rss_kib("Name:\tkworker\nState:\tI (idle)\n") == 0
    with pytest.raises(procstat.ProcStatError):
        procstat.rss_kib("VmRSS:\tlots kB\n")


def test_cpu_seconds_counts_only_processes_seen_twice() -> None:
    before = procstat.CpuSample({1: 100, 2: 50, 3: 10})
    after = procstat.CpuSample({1: 350, 2: 50, 4: 999})  # 3 exited, 4 started in between
    assert procstat.cpu_seconds(before, after, hz=100) == pytest.approx(2.5)


def test_per_thousand_requests() -> None:
    assert procstat.per_thousand(2.5, 5000) == pytest.approx(0.5)
    assert procstat.per_thousand(2.5, 0) is None


def test_sampling_this_process_sees_its_own_cpu_and_memory(tmp_path: Path) -> None:
    pid = os.getpid()
    before = procstat.sample_cpu([pid, 2**22 + 7])  # the second PID does not exist
    assert set(before.ticks) == {pid}
    deadline = os.times().elapsed + 5
    x = 0
    while procstat.sample_cpu([pid]).ticks[pid] - before.ticks[pid] < 3:
        x += sum(range(1000))
        assert os.times().elapsed < deadline
    assert procstat.cpu_seconds(before, procstat.sample_cpu([pid])) > 0
    assert procstat.rss_of([pid])[pid] > 1000
    assert pid in procstat.descendants(os.getppid())


ROLLUP = """55c165e94000-7ffda8590000 ---p 00000000 00:00 0                          [rollup]
Rss:               67012 kB
Pss:               14630 kB
Pss_Dirty:         12001 kB
Pss_Anon:          11960 kB
Shared_Clean:      52700 kB
Private_Dirty:     12000 kB
"""


def test_smaps_rollup_reads_pss_and_rss_not_their_look_alikes() -> None:
    # Pss_Dirty/Pss_Anon start with "Pss" too: only the exact key counts
    assert procstat.smaps_rollup(ROLLUP) == procstat.Memory(pss_kib=14630, rss_kib=67012)
    assert procstat.smaps_rollup("") == procstat.Memory(0, 0)  # kernel thread
    with pytest.raises(procstat.ProcStatError, match="smaps_rollup"):
        procstat.smaps_rollup(ROLLUP.replace("14630 kB", "lots kB"))
    with pytest.raises(procstat.ProcStatError, match="no Pss or no Rss"):
        procstat.smaps_rollup(ROLLUP.replace("Pss:", "Xss:"))


def test_pss_of_this_process_from_its_real_smaps_rollup() -> None:
    """The kernel's own file for the test process parses, and PSS <= RSS (the interpreter's
    shared libraries are mapped by other processes too, so they are only partly ours)."""
    pid = os.getpid()
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    mem = procstat.smaps_rollup(text)
    assert 0 < mem.pss_kib <= mem.rss_kib
    got = procstat.memory_of([pid, 2**22 + 7])  # the second PID does not exist
    assert set(got) == {pid}
    assert 0 < got[pid].pss_kib <= got[pid].rss_kib
    # RSS here agrees with VmRSS of /proc/<pid>/status to within what moved between two reads
    assert abs(got[pid].rss_kib - procstat.rss_of([pid])[pid]) < 8192
