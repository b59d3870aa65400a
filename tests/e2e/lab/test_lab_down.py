"""`lab down` after a crash of the mesh: the node proxies killed with SIGKILL leave their BPF
programs attached to the pods' cgroups, their pins, their enrolment sockets and state; a
fresh `down` (as a new `meshctl lab down` process runs it) still removes everything, and the
kernel frees every program and map the lab had (root only)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from bpf import syscall
from meshctl.lab.lab import Lab
from meshctl.lab.system import proc_alive
from meshctl.lab.ztunnels import ZtunnelFeatures
from tests.e2e.lab.labkit import LabFactory, leftovers, seen


def test_down_after_ztunnels_were_killed_leaves_nothing(lab_factory: LabFactory) -> None:
    if not ZtunnelFeatures.probe().enrol_socket:
        pytest.skip("ztunnel has no --enrol-socket")
    lab = lab_factory(mesh=True, capture="enrol")
    was = seen(lab)
    nodes = {r.name: r for r in lab.state.procs if r.kind == "ztunnel"}
    assert set(nodes) == {"n1", "n2"}
    # the things a crash leaves: one set of pinned programs and maps per node, host-side links
    assert {pin.split("/")[-2] for _, _, pin in was.bpf} == {"n1", "n2"}
    assert {k for k, _, _ in was.bpf} == {"prog", "map"}
    assert was.links
    assert all(syscall.exists(kind, ident) for kind, ident, _ in was.bpf)  # the check can fail
    for rec in nodes.values():
        os.kill(rec.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # the lab ran in this process: reap
            os.waitpid(rec.pid, 0)
    deadline = time.monotonic() + 10
    while any(proc_alive(r.pid, r.start_time) for r in nodes.values()):
        assert time.monotonic() < deadline, "ztunnels did not die"
        time.sleep(0.05)
    for node in nodes:
        assert lab.paths.enrol_socket(node).exists()  # a crash does not clean up
    fresh = Lab(lab.paths, out=lambda _m: None)
    assert fresh.down(quiet=True) == []
    assert leftovers(lab.paths, [], was) == []
