"""The HBONE server (ztunnel's :15008 connection object) fed hostile HTTP/2: it answers with
GOAWAY/RST/4xx and never raises, hangs, or keeps a stream or task past the connection."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fuzz.seeds import hbone_seeds
from benchmarks.fuzz.targets import HboneTarget
from tests.fuzz.fuzzkit import CI, H2_STREAMS, SETTINGS, encode_headers, frame


@pytest.fixture(scope="module")
def target() -> Iterator[HboneTarget]:
    t = HboneTarget()
    yield t
    t.close()


@CI
@given(data=H2_STREAMS)
def test_frames(target: HboneTarget, data: bytes) -> None:
    target(data)


@CI
@given(seed=st.sampled_from(hbone_seeds()), cut=st.integers(0, 4096), junk=st.binary(max_size=32))
def test_seeds_cut_and_spliced(target: HboneTarget, seed: bytes, cut: int, junk: bytes) -> None:
    """Valid exchanges cut anywhere, with junk spliced in: a frame boundary is where the
    interesting states are."""
    target(seed[:cut] + junk + seed[cut:])


def test_connect_then_reset_in_one_write(target: HboneTarget) -> None:
    """A CONNECT and its RST_STREAM in one read (the reset-stream attack's shape)."""
    hs = encode_headers([(":method", "CONNECT"), (":authority", "10.0.0.2:8080")])
    data = SETTINGS + b"".join(
        frame(0x1, 0x4, sid, hs) + frame(0x3, 0, sid, b"\x00\x00\x00\x08")
        for sid in range(1, 400, 2)
    )
    target(data)


def _raw_headers_frame(sid: int, value: bytes) -> bytes:
    """HEADERS whose x-bad value is not UTF-8 (hpack literal, not indexed, no Huffman)."""
    enc = encode_headers([(":method", "CONNECT"), (":authority", "10.0.0.2:8080")])
    name = b"x-bad"
    lit = b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    return frame(0x1, 0x4, sid, enc + lit)


def test_non_utf8_header_value(target: HboneTarget) -> None:
    target(SETTINGS + _raw_headers_frame(1, b"\xe0\x80"))
