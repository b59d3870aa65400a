"""A cost h2 imposes on every received frame, removed.

h2 (4.x) logs each received frame with `logger.trace("Received frame: %s", repr(frame))`: the
repr is built even when nothing logs, and hyperframe's repr of a DATA frame hex-encodes the
*whole* payload before cutting it to 20 characters. With our 256 KiB frames that was about a
tenth of the tunnel's CPU under bulk load (py-spy). `install()` swaps hyperframe's helper for
one that encodes only the bytes it shows; the text it returns is the same.
"""

from __future__ import annotations

import binascii

import hyperframe.frame

_SHOWN = 10  # bytes: 20 hex characters, what hyperframe keeps


def _raw_data_repr(data: bytes | None) -> str:
    if not data:
        return "None"
    r = binascii.hexlify(data[: _SHOWN + 1]).decode("ascii")
    if len(r) > 2 * _SHOWN:
        r = r[: 2 * _SHOWN] + "..."
    return "<hex:" + r + ">"


def install() -> None:
    """Idempotent; applies process-wide (every h2 user in the process benefits)."""
    hyperframe.frame._raw_data_repr = _raw_data_repr
