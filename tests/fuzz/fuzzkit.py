"""Hypothesis strategies shared by the fuzz tests: HTTP/2 frames (well-formed enough to reach
the state machines, wrong enough to hit their error paths), and the bounded settings CI runs
them with (a short pass: the long run is `python -m benchmarks.fuzz`)."""

from __future__ import annotations

import struct

import hpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Every fuzz test together stays well under a minute on the loaded CI machine.
CI = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)

FRAME_TYPES = st.one_of(st.sampled_from(range(10)), st.integers(0, 255))
STREAM_IDS = st.one_of(st.sampled_from([0, 1, 3, 5, 7, 2, 0x7FFFFFFF]), st.integers(0, 2**31 - 1))


def frame(typ: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">HBBBL", (n >> 8) & 0xFFFF, n & 0xFF, typ, flags, sid) + payload


_NAMES = st.sampled_from(
    [":method", ":authority", ":path", ":scheme", ":status", ":protocol", "content-length",
     "transfer-encoding", "te", "forwarded", "x-ambientmesh-source-principal", "connection",
     "host", "cookie", "grpc-timeout", "X-Upper", ""]
)  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(
        ["CONNECT", "GET", "POST", "10.0.0.2:8080", "10.0.0.1:1", "127.0.0.1:15001", "/", "http",
         "trailers", "chunked", "5", "-1", "99999999999999999999", "for=1.2.3.4", "a b", ""]
    ),
    st.text(max_size=40),
)  # fmt: skip
HEADER_LISTS = st.lists(st.tuples(_NAMES, _VALUES), max_size=8)


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    return bytes(hpack.Encoder().encode(headers))


@st.composite
def h2_frame(draw: st.DrawFn) -> bytes:
    """One frame: a HEADERS/CONTINUATION with an hpack block (valid or garbled) half the time,
    else any type, flags, stream and payload, sometimes with a lying length."""
    kind = draw(st.integers(0, 3))
    sid = draw(STREAM_IDS)
    flags = draw(st.integers(0, 255))
    if kind == 0:
        block = encode_headers(draw(HEADER_LISTS))
        if draw(st.booleans()):
            block = block[: draw(st.integers(0, len(block)))]
        return frame(draw(st.sampled_from([0x1, 0x9])), flags | draw(st.sampled_from([4, 5])),
                     sid, block)  # fmt: skip
    if kind == 1:  # CONNECT with the fields a server checks
        hs = [(":method", "CONNECT"), (":authority", draw(_VALUES)), *draw(HEADER_LISTS)]
        return frame(0x1, 0x4 | draw(st.sampled_from([0, 1])), sid | 1, encode_headers(hs))
    typ = draw(FRAME_TYPES)
    payload = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.none(), st.integers(0, 2**24 - 1)))
    if length is not None and length > len(payload):
        length = None if draw(st.booleans()) else length
    return frame(typ, flags, sid, payload, length)


SETTINGS = frame(0x4, 0, 0, b"")
H2_STREAMS = st.lists(h2_frame(), max_size=12).map(lambda fs: SETTINGS + b"".join(fs))
