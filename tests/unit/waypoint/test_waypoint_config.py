"""The waypoint runs on a frozen `WaypointConfig` built once from its flags: the flags land in
it parsed, its defaults are the parser's, and the combinations refused at start are refused
with the messages the process prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from waypoint.config import WaypointConfig, WaypointConfigError
from waypoint.limits import Limits
from waypoint.main import build_parser


def config(*argv: str) -> WaypointConfig:
    return WaypointConfig.from_args(build_parser().parse_args(["--namespace", "shop", *argv]))


def test_defaults_are_the_parsers() -> None:
    assert config("--ca-dir", "/ca") == WaypointConfig(namespace="shop", ca_dir="/ca")


def test_flags_reach_the_config_parsed(tmp_path: Path) -> None:
    bundle = tmp_path / "root.pem"
    bundle.write_bytes(b"PEM")
    c = config(
        "--name", "wp", "--service-account", "sa", "--config", "a.yaml",
        "--ca", "ca.example:15012", "--ca-bundle", str(bundle), "--token-file", "/t",
        "--hbone-addr", "127.0.0.1:1", "--metrics-addr", ":2", "--readiness-addr", "[::1]:3",
        "--admin-addr", "127.0.0.1:4", "--upstream-hbone-port", "5", "--cert-ttl", "60",
        "--max-header-bytes", "2048", "--max-headers", "10", "--headers-timeout", "1",
        "--idle-timeout", "2", "--max-concurrent-streams", "3", "--max-connections", "4",
    )  # fmt: skip
    assert (c.name, c.service_account, c.config) == ("wp", "sa", ("a.yaml",))
    assert (c.ca, c.ca_bundle_pem, c.token_file) == (("ca.example", 15012), b"PEM", "/t")
    assert c.hbone_addr == ("127.0.0.1", 1) and c.metrics_addr == ("0.0.0.0", 2)
    assert c.readiness_addr == ("::1", 3) and c.admin_addr == ("127.0.0.1", 4)
    assert (c.upstream_hbone_port, c.cert_ttl) == (5, 60.0)
    assert c.limits == Limits(2048, 10, 1.0, 2.0, 3, 4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give --ca-dir or --ca (the CA signing our SVID)"),
        (("--ca-dir", "/ca", "--ca", "h:1"), "give --ca-dir or --ca (the CA signing our SVID)"),
        (("--ca", "nope"), "--ca 'nope': expected HOST:PORT"),
        (("--ca", "h:1"), "--ca needs --ca-bundle (the trust bundle PEM)"),
        (("--ca-dir", "/ca", "--hbone-addr", "h:99999"), "--hbone-addr 'h:99999': expected"),
        (("--ca-dir", "/ca", "--max-headers", "0"), "limits: "),
    ],
)
def test_refusals(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(WaypointConfigError) as exc:
        config(*argv)
    assert str(exc.value).startswith(message)


def test_a_missing_bundle_is_refused_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    with pytest.raises(WaypointConfigError, match=f"--ca-bundle {missing}: No such file"):
        config("--ca", "h:1", "--ca-bundle", str(missing))


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        WaypointConfig(namespace="a").namespace = "b"  # type: ignore[misc]


def test_kube_is_one_source_or_the_other() -> None:
    c = config("--ca-dir", "/ca", "--kube", "--kubeconfig", "/kc")
    assert (c.kube, c.kubeconfig, c.config) == (True, "/kc", ())
    with pytest.raises(WaypointConfigError, match="give --kube or --config, not both"):
        config("--ca-dir", "/ca", "--kube", "--config", "a.yaml")
    with pytest.raises(WaypointConfigError, match="--kubeconfig needs --kube"):
        config("--ca-dir", "/ca", "--kubeconfig", "/kc")
