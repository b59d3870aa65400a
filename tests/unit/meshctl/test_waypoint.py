"""`meshctl waypoint` writes, lists and removes real Gateway manifests in a tmp config dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshctl import cli


@pytest.fixture(autouse=True)
def _with_waypoint_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    if "meshctl.waypoint" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "meshctl.waypoint"))


def test_apply_list_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["waypoint", "apply", "-n", "bookinfo", "--config-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.yaml"))
    assert len(files) == 1
    doc = yaml.safe_load(files[0].read_text())
    assert doc["kind"] == "Gateway"
    assert doc["metadata"] == {
        "name": "waypoint",
        "namespace": "bookinfo",
        "labels": {"istio.io/waypoint-for": "service"},
    }
    assert doc["spec"]["gatewayClassName"] == "waypoint"
    assert doc["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]

    capsys.readouterr()
    assert cli.main(["waypoint", "list", "--config-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bookinfo" in out and "waypoint" in out

    assert (
        cli.main(
            [
                "waypoint",
                "delete",
                "-n",
                "bookinfo",
                "--name",
                "waypoint",
                "--config-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert list(tmp_path.glob("*.yaml")) == []


def test_operator_mistakes_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["waypoint", "delete", "-n", "nope", "--config-dir", str(tmp_path)]) == 2
    assert "waypoint nope/waypoint: not found" in capsys.readouterr().err
    assert cli.main(["waypoint", "apply", "-n", "Bad_NS", "--config-dir", str(tmp_path)]) == 2
    assert "-n 'Bad_NS'" in capsys.readouterr().err
    assert (
        cli.main(["waypoint", "apply", "-n", "ok", "--config-dir", str(tmp_path / "missing")]) == 2
    )
    assert "not a directory" in capsys.readouterr().err
