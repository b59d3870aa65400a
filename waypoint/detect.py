"""Which HTTP version is inside a waypoint stream: the HTTP/2 preface, else HTTP/1.1.

Sans-IO: the glue feeds the first bytes it has; `None` means "not enough bytes to tell yet"
(only while they are still a prefix of the 24-byte preface), so a slow client never gets
misclassified and a short HTTP/1.1 request is not held back waiting for 24 bytes.
"""

from __future__ import annotations

from typing import Literal

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Protocol = Literal["h2", "http/1.1"]


def detect(first: bytes) -> Protocol | None:
    n = min(len(first), len(H2_PREFACE))
    if first[:n] != H2_PREFACE[:n]:
        return "http/1.1"
    return "h2" if n == len(H2_PREFACE) else None
