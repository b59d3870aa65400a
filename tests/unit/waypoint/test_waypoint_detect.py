from __future__ import annotations

from waypoint.detect import H2_PREFACE, detect


def test_detects_h2_preface_and_http1() -> None:
    assert detect(H2_PREFACE + b"\x00\x00") == "h2"
    assert detect(b"GET / HTTP/1.1\r\n") == "http/1.1"
    assert detect(b"P") is None  # could still be either
    assert detect(b"POST / HTTP/1.1") == "http/1.1"  # diverges at the 2nd byte
    assert detect(H2_PREFACE[:10]) is None
    assert detect(b"") is None
