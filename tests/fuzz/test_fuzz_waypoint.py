"""The waypoint's downstream HTTP/1.1 and HTTP/2 servers fed hostile bytes: a bad request is a
400, a reset or a GOAWAY, and nothing raises, hangs, or outlives the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fuzz.seeds import h1_seeds, h2_seeds
from benchmarks.fuzz.targets import H1Target, H2Target, MemoryWire, _answer
from tests.fuzz.fuzzkit import CI, H2_STREAMS, SETTINGS, frame


@pytest.fixture(scope="module")
def h1() -> Iterator[H1Target]:
    t = H1Target()
    yield t
    t.close()


@pytest.fixture(scope="module")
def h2t() -> Iterator[H2Target]:
    t = H2Target()
    yield t
    t.close()


_TOKENS = st.sampled_from(
    ["GET", "POST", "PUT", "CONNECT", "G\x00T", "/", "/a?b=c", "*", "http://x/", "HTTP/1.1",
     "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", " ", "\t"]
)  # fmt: skip
_HEADER = st.one_of(
    st.sampled_from(
        ["Host: a", "Content-Length: 5", "Content-Length: -1", "Content-Length: 5, 6",
         "Content-Length: 99999999999999999999999", "Transfer-Encoding: chunked",
         "Transfer-Encoding: gzip, chunked", "Transfer-Encoding: chunked\r\n :x",
         "Expect: 100-continue", "Connection: close", "Connection: upgrade", "Upgrade: h2c",
         "TE: trailers", "X: \x00", "X-Long: " + "a" * 70000, ": empty", "NoColon"]
    ),
    st.text(max_size=30).map(lambda t: f"x-f: {t}"),
)  # fmt: skip
_BODY = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"-1\r\n", b"5;ext\r\nhello\r\n",
         b"0\r\nx-t: 1\r\n\r\n", b"3\r\nabcde\r\n", b"\r\n\r\n"]
    ),
)  # fmt: skip


@st.composite
def h1_requests(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        line = " ".join(draw(st.lists(_TOKENS, min_size=1, max_size=4)))
        headers = draw(st.lists(_HEADER, max_size=6))
        out += ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("utf-8", "replace")
        out += draw(_BODY)
    return out


@CI
@given(data=h1_requests())
def test_h1_requests(h1: H1Target, data: bytes) -> None:
    h1(data)


@CI
@given(seed=st.sampled_from(h1_seeds()), cut=st.integers(0, 200), junk=st.binary(max_size=16))
def test_h1_seeds_spliced(h1: H1Target, seed: bytes, cut: int, junk: bytes) -> None:
    h1(seed[:cut] + junk + seed[cut:])


@CI
@given(data=H2_STREAMS)
def test_h2_frames(h2t: H2Target, data: bytes) -> None:
    h2t(data)


@CI
@given(seed=st.sampled_from(h2_seeds()), cut=st.integers(0, 400), junk=st.binary(max_size=16))
def test_h2_seeds_spliced(h2t: H2Target, seed: bytes, cut: int, junk: bytes) -> None:
    h2t(seed[:cut] + junk + seed[cut:])


async def test_h2_rapid_reset_keeps_no_task() -> None:
    from waypoint.h2 import H2Server

    wire = MemoryWire()
    srv = H2Server(_answer)
    srv.join(wire)
    srv.start()
    wire.join(srv)
    run = asyncio.get_running_loop().create_task(srv.run())
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    srv.write(c.data_to_send())
    for _ in range(200):
        sid = c.get_next_available_stream_id()
        hs = [(":method", "GET"), (":path", "/"), (":authority", "a"), (":scheme", "http")]
        c.send_headers(sid, hs, end_stream=True)
        c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        srv.write(c.data_to_send())
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    left = len(srv._tasks)
    srv.abort()
    await run
    assert left == 0, f"{left} finished request tasks still held by a live connection"


def test_h2_non_utf8_header_value(h2t: H2Target) -> None:
    enc = bytes(hpack.Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http")]))
    lit = b"\x00\x05x-bad\x02\xe0\x80"
    h2t(SETTINGS + frame(0x1, 0x5, 1, enc + lit))
