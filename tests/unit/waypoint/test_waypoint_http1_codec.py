"""Sans-IO pieces of the HTTP/1.1 stream: message parsing and hop-by-hop stripping."""

from __future__ import annotations

import pytest

from waypoint.http1 import BadMessage, MessageReader, serialize_request


def test_pipelined_requests_and_chunked_body() -> None:
    m = MessageReader()
    m.feed(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    a, b = m.done
    assert (a.method, a.target, b.method, bytes(b.body)) == ("GET", "/a", "POST", b"abc")
    assert ("host", "x") in a.headers


def test_malformed_and_oversized() -> None:
    with pytest.raises(BadMessage):
        MessageReader().feed(b"\x00\x01\x02 junk\r\n\r\n")
    small = MessageReader(max_body=4)
    with pytest.raises(BadMessage, match="too large"):
        small.feed(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\n0123456789")


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    raw = serialize_request(
        "GET",
        "/",
        [
            ("host", "x"),
            ("connection", "x-secret, keep-alive"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("x-ok", "2"),
        ],
        b"",
    )
    assert b"x-secret" not in raw and b"te:" not in raw and b"connection" not in raw
    assert b"x-ok: 2" in raw and b"host: x" in raw
