"""What one HBONE listener lets a peer cost it (DESIGN.md §1: hostile input is normal input).

Every limit refuses *new* work and leaves existing work alone: a stream past the stream limit
is refused with RST_STREAM(REFUSED_STREAM), the connection stays; a connection past the
per-peer or per-node count is closed before its first stream, the others stay. Each refusal is
reported through the listener's `on_refused(reason, peer)` hook, which ztunnel turns into a
metric (`ambientmesh_refused_total{reason}`) and an access-log line with Istio's `UO` flag.

Response flags in ztunnel's access log and `istio_tcp_connections_closed_total`, by Envoy's
names as Istio uses them: `UO` (upstream overflow) for a stream, connection or upstream dial
refused by a limit; `DT` for a handshake not completed within the handshake timeout; `NR` (no
route) for a dial refused because its destination is one of ztunnel's own listeners;
`DC`/`UF`/`DENY` keep their existing meanings.

The one exception is the header-list size: HPACK state is shared by every stream of a
connection, so a header block too large to decode leaves the connection unusable and h2 ends
it (GOAWAY); other connections are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

__all__ = ["ConnectionGate", "HboneLimits", "RefusedHook"]

# reason, peer address (or None before the handshake told us)
RefusedHook = Callable[[str, "tuple[str, int] | None"], None]


@dataclass(frozen=True, slots=True)
class HboneLimits:
    """Defaults a production node accepts: generous for a node's legitimate peers (one
    connection per source identity per node, pooled), tight for a single hostile one."""

    handshake_timeout: float = 10.0  # TCP accept to TLS done (stalled handshakes)
    max_streams: int = 100  # concurrent CONNECT streams per connection (advertised = enforced)
    max_header_list_size: int = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE, enforced by HPACK
    idle_timeout: float = 300.0  # a server-side connection carrying no stream is closed
    max_connections_per_peer: int = 1024  # established HBONE connections from one peer IP
    max_connections: int = 10000  # established HBONE connections, all peers, all listeners

    def dump(self) -> dict[str, float | int]:
        return asdict(self)


class ConnectionGate:
    """Counts a node's established HBONE server connections, per peer IP and in total. One
    gate is shared by every HBONE listener of a node (the node's and each pod's :15008)."""

    __slots__ = ("_by_peer", "limits", "total")

    def __init__(self, limits: HboneLimits) -> None:
        self.limits = limits
        self._by_peer: dict[str, int] = {}
        self.total = 0

    def admit(self, peer_ip: str) -> str | None:
        """Count a new connection, or say why it is refused (then nothing is counted)."""
        if self.total >= self.limits.max_connections:
            return "connections"
        n = self._by_peer.get(peer_ip, 0)
        if n >= self.limits.max_connections_per_peer:
            return "connections_per_peer"
        self._by_peer[peer_ip] = n + 1
        self.total += 1
        return None

    def release(self, peer_ip: str) -> None:
        n = self._by_peer.get(peer_ip, 0)
        if n <= 1:
            self._by_peer.pop(peer_ip, None)
        else:
            self._by_peer[peer_ip] = n - 1
        self.total = max(0, self.total - 1)

    def peers(self) -> int:
        return len(self._by_peer)
