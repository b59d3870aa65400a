"""What a hostile or broken client may cost the waypoint, and how refusals are reported.

Every downstream HTTP connection (one HBONE CONNECT stream) runs under one `Limits`: past a
limit the new work is refused with a clear status (HTTP/1.1) or stream error (HTTP/2) while
the rest of the connection, and every other connection, keeps serving. The defaults are what
a production proxy ships with (Envoy's 60 KiB / 100 headers, nginx's and Go's 100 streams), so
a well-behaved client never meets them.

A refusal is one `Refusal`, reported through the connection's `on_refused`: the request
handler turns it into an access-log line and the metrics, with the response flag Istio would
show (`DPE` downstream protocol error, `SI` stream idle/header timeout, `OM` overload).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# Envoy's names (Istio shows them as response_flags).
PROTOCOL_ERROR = "DPE"
TIMEOUT = "SI"
OVERLOAD = "OM"


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # request line/target and the header section
    max_headers: int = 100  # header fields in one request
    headers_timeout: float = 10.0  # from a request's first byte until its whole head is in
    idle_timeout: float = 3600.0  # a connection with no request in flight and no bytes
    max_concurrent_streams: int = 100  # HTTP/2 streams in flight on one connection
    max_connections: int = 4096  # downstream HTTP connections (CONNECT streams) at once
    # HTTP/2 abuse: control frames (PING, SETTINGS) per `flood_window` seconds, and
    # streams the client resets before the answer (CVE-2023-44487): past `rapid_resets` of
    # them, when they are at least half the connection's streams, GOAWAY ENHANCE_YOUR_CALM.
    max_control_frames: int = 1000
    flood_window: float = 10.0
    rapid_resets: int = 500

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuse a limit that would break every client (zero or negative)."""
        for k, v in self.as_dict().items():
            if not v > 0:
                raise ValueError(f"{k} must be positive, got {v!r}")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Work the waypoint refused before forwarding anything."""

    status: int  # the HTTP status answered (0: none could be, e.g. a connection-level GOAWAY)
    flag: str  # Istio/Envoy response flag
    reason: str  # short, for the metric label: bad_framing, header_too_large, ...
    detail: str  # for the log
    method: str = "-"
    path: str = "-"
    log: bool = True  # False: counted only (a repeat the access log already shows)


OnRefused = Callable[[Refusal], None]
