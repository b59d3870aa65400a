"""Decoding the connect4 program's drop events (the ring buffer itself is read in
tests/e2e/bpf/test_egress_policy.py, from a real kernel)."""

from __future__ import annotations

import struct

import pytest

from bpf.events import decode


def _sample(reason: int, policy: int) -> bytes:
    # struct drop_event: boot_ns, netns, cgroup, dst_ip (network order), dst_port, reason,
    # policy, pad
    return struct.pack("<QQQ4sHHII", 5_000_000_000, 4097, 77, bytes([10, 79, 0, 1]), 8080,
                       reason, policy, 0)  # fmt: skip


def test_policy_drop() -> None:
    ev = decode(_sample(1, 0xDEADBEEF), boot_offset=1_700_000_000.0)
    assert ev.time == pytest.approx(1_700_000_005.0)
    assert (ev.netns_cookie, ev.cgroup_id, ev.dst_ip, ev.dst_port) == (4097, 77, "10.79.0.1", 8080)
    assert (ev.reason, ev.policy_id) == ("policy-denied", 0xDEADBEEF)


def test_ztunnel_unavailable_and_unknown_reasons() -> None:
    assert decode(_sample(2, 0), 0.0).reason == "ztunnel-unavailable"
    assert decode(_sample(9, 0), 0.0).reason == "unknown(9)"


def test_short_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="drop event of 8 bytes"):
        decode(b"\0" * 8)
