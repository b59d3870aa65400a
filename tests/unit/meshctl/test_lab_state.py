"""The state file: survives a reload intact, and a PID is ours only with its start time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from meshctl.lab.processes import resolve_command
from meshctl.lab.state import CniRecord, LabState, ProcRecord
from meshctl.lab.system import proc_alive, proc_start_time


def test_round_trip_keeps_every_record(tmp_path: Path) -> None:
    st = LabState("x", tmp_path / "labs" / "x.json")
    st.add_netns("x-underlay")
    st.add_netns("x-underlay")  # recorded once
    st.add_cgroup("/sys/fs/cgroup/unified/ambientmesh/x/pods/a/b")
    st.cni.append(CniRecord("a/b", "n1", "x-a.b", "x-pod-a.b", [{"type": "loopback"}], [{}]))
    st.add_proc(ProcRecord("pod", "a/b", 123, 456, "/tmp/log"))
    st.nodes["n1"] = {"ip": "172.30.0.1"}
    st.save()
    back = LabState.load(st.path)
    assert back is not None
    assert back.netns == ["x-underlay"]
    assert back.cni[0].configs == [{"type": "loopback"}] and back.cni[0].node == "n1"
    assert back.procs[0].pid == 123 and back.procs[0].start_time == 456
    assert back.nodes == {"n1": {"ip": "172.30.0.1"}}
    back.drop_proc(123)
    reloaded = LabState.load(st.path)
    assert reloaded is not None and reloaded.procs == []
    assert not list(st.path.parent.glob("*.tmp"))  # atomic writes leave no temp file


def test_missing_state_is_none_and_garbage_is_an_error(tmp_path: Path) -> None:
    assert LabState.load(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    try:
        LabState.load(bad)
    except ValueError as exc:
        assert str(bad) in str(exc)
    else:
        raise AssertionError("garbage state accepted")


def test_recycled_pid_is_not_ours() -> None:
    me = os.getpid()
    start = proc_start_time(me)
    assert start is not None and proc_alive(me, start)
    assert not proc_alive(me, start + 1)


def test_python_in_a_manifest_means_this_interpreter() -> None:
    assert resolve_command(["python", "-m", "x"]) == [sys.executable, "-m", "x"]
    assert resolve_command(["sleep", "1"]) == ["sleep", "1"]
