"""meshctl doctor: exit status follows required checks; each miss prints its fix."""

from __future__ import annotations

import argparse

import pytest

import bpf.doctor as doctor
from bpf.cli import _doctor


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
