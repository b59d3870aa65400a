"""A process the lab starts that dies or never gets ready is reported with its own last log
lines (the real reason and its fix), at once when it died: real child processes, tracked by
PID as the lab tracks them (never waited on, so a dead one lingers as a zombie)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.lab.system import LabError, proc_alive, proc_start_time, stop_process, wait_ready


def spawn(code: str, log: Path) -> tuple[int, int]:
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT)
    proc.returncode = 0  # tracked by PID from here on, like the lab's processes
    return proc.pid, proc_start_time(proc.pid) or 0


def never_ready() -> None:
    raise ConnectionRefusedError(111, "Connection refused")


def test_a_process_that_exits_is_reported_at_once_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "ztunnel.log"
    pid, start = spawn("import sys; print('warming up'); "
                       "sys.exit('bpf.loader: no bpffs; fix: mount -t bpf bpf /sys/fs/bpf')",
                       log)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(LabError) as err:
        wait_ready("ztunnel node1", pid, start, log, never_ready, timeout=60)
    assert time.monotonic() - t0 < 30  # not the 60 s timeout: the exit is seen
    msg = str(err.value)
    assert "ztunnel node1 exited before it was ready" in msg
    assert "fix: mount -t bpf bpf /sys/fs/bpf" in msg and "warming up" in msg
    assert not os.path.exists(f"/proc/{pid}")  # and it was reaped, not left a zombie


def test_a_process_that_never_gets_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "waypoint.log"
    pid, start = spawn("import time; print('waiting for the CA at 10.0.0.1', flush=True); "
                       "time.sleep(60)", log)  # fmt: skip
    try:
        time.sleep(0.3)
        with pytest.raises(LabError) as err:
            wait_ready("waypoint shop/waypoint", pid, start, log, never_ready, timeout=0.5)
        msg = str(err.value)
        assert "not ready after" in msg and "Connection refused" in msg
        assert "waiting for the CA at 10.0.0.1" in msg
    finally:
        stop_process(pid, start, group=False)
    assert not proc_alive(pid, start)


def test_ready_returns(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    pid, start = spawn("import time; time.sleep(60)", log)
    calls = []
    try:
        wait_ready("app", pid, start, log, lambda: calls.append(1), timeout=5)
        assert calls == [1]
    finally:
        stop_process(pid, start, group=False)


def test_a_missing_log_is_said_not_raised(tmp_path: Path) -> None:
    pid, start = spawn("pass", tmp_path / "x.log")
    with pytest.raises(LabError, match="no log at"):
        wait_ready("app", pid, start, tmp_path / "elsewhere.log", never_ready, timeout=5)
