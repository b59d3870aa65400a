"""The byte-stream endpoint that every proxied connection is made of.

A proxied connection is two endpoints joined back to back: a TCP socket and an HBONE stream
(ztunnel), or an HBONE stream and an HTTP exchange (waypoint). Joining them with callbacks,
not a coroutine per direction reading and writing chunks, keeps the per-chunk cost to one
Python call and lets back-pressure travel as pause/resume calls: when one endpoint cannot
take more (its socket buffer or HTTP/2 window is full), it pauses the other's reading, which
for HBONE means it stops returning flow-control credit (DESIGN.md §7).

The contract, for an endpoint `e` joined to a peer `p` by `e.join(p)` and `p.join(e)`:
- bytes `e` receives from its wire go to `p.write()`; end of input goes to `p.write_eof()`;
- `p` calls `e.pause_reading()` when its output buffer is above its high-water mark and
  `e.resume_reading()` when it drains below the low-water mark;
- an error or reset on one side is `p.abort()` on the other; the connection is done when both
  endpoints' `done` futures are resolved.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Endpoint(Protocol):
    """One side of a proxied connection. Implementations: TCP (ztunnel), HBONE stream."""

    def join(self, peer: Endpoint) -> None:
        """Start delivering received bytes to `peer`. Called once, before any data flows."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes out of this endpoint's wire. Never blocks; buffers and signals
        back-pressure to the peer through `peer.pause_reading()`."""

    def write_eof(self) -> None:
        """Half-close: no more bytes will be written (TCP FIN, HTTP/2 END_STREAM)."""

    def abort(self) -> None:
        """Tear down at once (TCP RST, HTTP/2 RST_STREAM); pending output is dropped."""

    def pause_reading(self) -> None:
        """Stop delivering bytes to the peer until `resume_reading()`."""

    def resume_reading(self) -> None:
        """Resume delivering bytes to the peer."""

    @property
    def done(self) -> asyncio.Future[None]:
        """Resolved when this endpoint has finished both directions or was aborted."""
        ...

    @property
    def bytes_received(self) -> int:
        """Bytes received from this endpoint's wire so far (for metrics and access logs)."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Bytes written out of this endpoint's wire so far."""
        ...


class EndpointState:
    """The `done` future and byte counters every endpoint keeps (TCP, HBONE stream, and the
    waypoint's HTTP connections), read by metrics and access logs when it finishes."""

    def __init__(self) -> None:
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._recv = 0
        self._sent = 0

    @property
    def done(self) -> asyncio.Future[None]:
        return self._done

    @property
    def bytes_received(self) -> int:
        return self._recv

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def count_offloaded(self, received: int, sent: int) -> None:
        """Bytes the kernel moved for this endpoint without it seeing them (ztunnel's sockmap
        fast path): the counters must still say what crossed the wire."""
        self._recv += received
        self._sent += sent


class EndpointBase(EndpointState):
    """What every proxied endpoint does the same way: holding bytes that arrive before `join`.
    Subclasses deliver on their hot path inline (`if self._peer is not None:
    self._peer.write(data)`), so this adds no call per chunk."""

    def __init__(self) -> None:
        super().__init__()
        self._peer: Endpoint | None = None
        self._early: list[bytes] = []  # bytes received before join()
        self._early_eof = False

    def join(self, peer: Endpoint) -> None:
        self._peer = peer
        for chunk in self._early:
            peer.write(chunk)
        self._early.clear()
        if self._early_eof:
            peer.write_eof()
