"""ztunnel runs on a frozen `ZtunnelConfig` built once from its flags: every flag lands in it,
its defaults are the parser's, and nothing can change it after start."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.hbone import HboneLimits
from ztunnel.config import ZtunnelConfig
from ztunnel.main import build_parser

BASE = ["--node", "n1", "--config", "a.yaml", "b.yaml", "--ca-dir", "/ca"]


def test_defaults_are_the_parsers() -> None:
    args = build_parser().parse_args(BASE)
    config = ZtunnelConfig.from_args(args, ktls_enabled=False)
    assert config == ZtunnelConfig(node="n1", config=("a.yaml", "b.yaml"), ca_dir="/ca")
    assert config.limits == HboneLimits()


def test_every_flag_reaches_the_config() -> None:
    argv = [
        *BASE,
        "--trust-domain", "example.org", "--cert-ttl", "60", "--hbone-addr", "127.0.0.1:1",
        "--outbound-addr", ":2", "--inbound-plaintext-addr", "127.0.0.2:3",
        "--admin-addr", "127.0.0.1:4", "--metrics-addr", "127.0.0.1:5",
        "--readiness-addr", "127.0.0.1:6", "--enrol-socket", "/run/e.sock",
        "--redirect", "bpf", "--bpf-pin-root", "/sys/fs/bpf/x", "--bpf-cgroup", "/cg",
        "--stream-cap", "7", "--pool-idle", "8", "--drain-timeout", "9",
        "--handshake-timeout", "1.5", "--max-streams", "11", "--max-header-list-size", "2048",
        "--hbone-idle-timeout", "12", "--max-connections-per-peer", "13",
        "--max-connections", "14", "--max-pending-dials", "15",
        "--log-level", "debug", "--log-format", "json", "--ktls", "off",
    ]  # fmt: skip
    config = ZtunnelConfig.from_args(build_parser().parse_args(argv), ktls_enabled=False)
    assert config.trust_domain == "example.org" and config.cert_ttl == 60.0
    assert config.hbone_addr == ("127.0.0.1", 1) and config.outbound_addr == ("0.0.0.0", 2)
    assert config.inbound_plaintext_addr == ("127.0.0.2", 3)
    assert (config.admin_addr, config.metrics_addr, config.readiness_addr) == (
        ("127.0.0.1", 4), ("127.0.0.1", 5), ("127.0.0.1", 6),
    )  # fmt: skip
    assert (config.enrol_socket, config.redirect) == ("/run/e.sock", "bpf")
    assert (config.bpf_pin_root, config.bpf_cgroup) == ("/sys/fs/bpf/x", "/cg")
    assert (config.stream_cap, config.pool_idle, config.drain_timeout) == (7, 8.0, 9.0)
    assert config.limits == HboneLimits(1.5, 11, 2048, 12.0, 13, 14)
    assert config.max_pending_dials == 15
    assert (config.log_level, config.log_format, config.ktls) == ("debug", "json", "off")


def test_frozen() -> None:
    config = ZtunnelConfig(node="n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node = "n2"  # type: ignore[misc]
