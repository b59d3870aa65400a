"""The HTTP/1.1 rules the observability ports and the CA share, fed bytes through a real
asyncio StreamReader (the reader's limit is the head size limit, as on the servers)."""

from __future__ import annotations

import asyncio

import pytest

from mesh.httpserver import HttpError, read_request, render


def reader_of(data: bytes, *, eof: bool = True, limit: int = 1024) -> asyncio.StreamReader:
    r = asyncio.StreamReader(limit=limit)
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


async def test_head_is_parsed_and_the_body_left_in_the_reader() -> None:
    r = reader_of(
        b"POST /v1/sign?a=1&b=2 HTTP/1.1\r\nHost: ca\r\nContent-Length: 4\r\n"
        b"Authorization:  Bearer  t0k \r\n\r\nbody"
    )
    req = await read_request(r, within=5)
    assert (req.method, req.path, req.query, req.version) == (
        "POST",
        "/v1/sign",
        {"a": "1", "b": "2"},
        "HTTP/1.1",
    )
    assert req.headers["authorization"] == "Bearer  t0k" and req.content_length() == 4
    assert await r.read() == b"body"


@pytest.mark.parametrize(
    ("raw", "status", "why"),
    [
        (b"\xff\xfe garbage\r\n\r\n", 400, "malformed request line"),
        (b"GET /x\r\n\r\n", 400, "malformed request line"),
        (b"GET /x SPDY/3\r\n\r\n", 400, "unsupported HTTP version"),
        (b"GET /hea", 400, "incomplete request"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431, "request head too large"),
    ],
)
async def test_bad_heads_are_errors_with_the_status_to_answer(
    raw: bytes, status: int, why: str
) -> None:
    with pytest.raises(HttpError) as e:
        await read_request(reader_of(raw), within=5)
    assert (e.value.status, str(e.value)) == (status, why)


async def test_a_head_that_never_ends_is_a_408() -> None:
    with pytest.raises(HttpError) as e:
        await read_request(reader_of(b"GET / HTTP/1.1\r\n", eof=False), within=0.05)
    assert e.value.status == 408


@pytest.mark.parametrize("value", ["-1", "12x", "1 2", ""])
async def test_a_content_length_that_is_not_a_length_is_a_400(value: str) -> None:
    raw = f"POST / HTTP/1.1\r\ncontent-length: {value}\r\n\r\n".encode()
    req = await read_request(reader_of(raw), within=5)
    with pytest.raises(HttpError) as e:
        req.content_length()
    assert e.value.status == 400


def test_head_answers_keep_the_length_of_the_body_they_leave_out() -> None:
    full = render(200, "text/plain", b"hello")
    assert full.startswith(b"HTTP/1.1 200 OK\r\n") and full.endswith(b"\r\n\r\nhello")
    assert b"content-length: 5\r\nconnection: close\r\n" in full
    assert render(200, "text/plain", b"hello", head_only=True) == full[:-5]
    assert render(599, "text/plain", b"").startswith(b"HTTP/1.1 599 Unknown\r\n")
