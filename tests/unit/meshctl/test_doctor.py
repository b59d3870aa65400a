"""meshctl doctor: exit status follows required checks; each miss prints its fix."""

from __future__ import annotations

import argparse

import pytest

import bpf.doctor as doctor
from meshctl.doctor import _doctor


def test_missing_required_check_exits_1_with_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        doctor, "CHECKS", (lambda: doctor.Check("cgroup v2", False, "", "mount -t cgroup2 x"),)
    )
    assert _doctor(argparse.Namespace()) == 1
    assert "MISSING" in capsys.readouterr().out


def test_optional_miss_keeps_exit_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        doctor, "CHECKS", (lambda: doctor.Check("kTLS", False, "", "modprobe tls", False),)
    )
    assert _doctor(argparse.Namespace()) == 0
    assert "fix: modprobe tls" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v595", True), ("5.15.0-91-generic", True), ("5.10.0-28-amd64", False),
     ("4.19.0+", False)],
)  # fmt: skip
def test_kernel_check_states_the_minimum_and_why(release: str, ok: bool) -> None:
    c = doctor._kernel(release)
    assert c.ok is ok
    assert "5.15" in c.name and "bpf_get_netns_cookie" in c.name
    assert c.detail == release and "5.15" in c.fix


def test_unparsable_kernel_release_is_reported_not_raised() -> None:
    c = doctor._kernel("weird")
    assert not c.ok and "'weird'" in c.detail
