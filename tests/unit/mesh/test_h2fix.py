"""The cheaper repr of DATA frames says exactly what hyperframe's said, and is in place once
`mesh.hbone` is imported."""

from __future__ import annotations

import binascii

import hyperframe.frame
import pytest

import mesh.hbone  # noqa: F401  (installs the fix)
from mesh.hbone import h2fix


def reference(data: bytes | None) -> str:
    """hyperframe's behaviour: hex of everything, cut to 20 characters."""
    if not data:
        return "None"
    r = binascii.hexlify(data).decode("ascii")
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 64, 256 * 1024])
def test_same_text_as_hyperframe(n: int) -> None:
    data = bytes(range(256)) * (n // 256 + 1)
    assert h2fix._raw_data_repr(data[:n]) == reference(data[:n])
    assert h2fix._raw_data_repr(None) == "None"


def test_installed_and_used_by_frame_repr() -> None:
    assert hyperframe.frame._raw_data_repr is h2fix._raw_data_repr
    frame = hyperframe.frame.DataFrame(1, data=b"\xab" * 100_000)
    assert repr(frame).endswith("<hex:abababababababababab...>")
