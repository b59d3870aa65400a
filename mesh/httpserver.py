"""The HTTP/1.1 both small servers speak: the proxies' observability ports and the CA service.

Neither is a hot path nor a general web server, so the rules are few and shared: one request
per connection, answered with `connection: close`; the request head must arrive whole within a
deadline and fit the stream reader's limit (the caller's `limit=` on `asyncio.start_server`);
a request line is `METHOD SP TARGET SP HTTP/1.x`. Whatever breaks those rules is an `HttpError`
carrying the status to answer with, so each server only decides what its error bodies look
like. Written once here so a fix to the parsing or the limits reaches both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

__all__ = ["REASONS", "HttpError", "Request", "read_request", "render", "send_and_close"]

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpError(Exception):
    """A request the server will not read further; `status` is what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; last one wins

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def content_length(self) -> int:
        """0 when absent; a value that is not a length is the client's error, not ours."""
        raw = self.headers.get("content-length", "0").strip()
        if not raw.isdigit():
            raise HttpError(400, f"bad content-length {raw[:20]!r}")
        return int(raw)


async def read_request(reader: asyncio.StreamReader, *, within: float) -> Request:
    """The request head (line and headers), which must arrive `within` seconds; the body, if
    any, is left in `reader`."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    except TimeoutError:
        raise HttpError(408, "request timeout") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    except asyncio.IncompleteReadError:
        raise HttpError(400, "incomplete request") from None
    first, _, rest = raw[:-4].partition(b"\r\n")
    try:
        method, target, version = first.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise HttpError(400, "unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in rest.decode("latin-1").split("\r\n") if rest else ():
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, target, version, headers)


def render(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    """A whole response; `head_only` (HEAD) keeps the length of the body it leaves out."""
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def send_and_close(
    writer: asyncio.StreamWriter, data: bytes, *, wait_closed: bool = True
) -> None:
    """Answer and hang up; a client that already went away is not an error.

    `wait_closed=False` for TLS servers: a peer that never answers our close_notify would
    hold the handler until the SSL shutdown timeout."""
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        if wait_closed:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
