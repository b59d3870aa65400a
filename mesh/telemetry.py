"""Per-connection and per-request telemetry, the same for both proxies.

One metric update and one access-log line per connection (`Accounting`) or per request
(`account_request`), never per chunk. Both proxies report through here so a connection counted
by ztunnel and a request counted by the waypoint carry the same labels and log fields.
"""

from __future__ import annotations

import dataclasses
import time

from mesh.accesslog import AccessRecord, log_access
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.stream import Endpoint


class Accounting:
    """One connection's telemetry: `opened` once, then `refused` or `finished` once."""

    __slots__ = ("done", "labels", "metrics", "record", "started")

    def __init__(
        self,
        metrics: MeshMetrics,
        labels: ConnectionLabels,
        *,
        reporter: str,
        src: str,
        dst: str,
        src_identity: str | None,
        dst_identity: str | None,
        service: str | None,
        mtls: bool,
        policy: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started = time.monotonic()
        self.done = False
        self.record: dict[str, object] = {
            "reporter": reporter,
            "src": src,
            "dst": dst,
            "src_identity": src_identity,
            "dst_identity": dst_identity,
            "service": service,
            "mtls": mtls,
            "policy": policy,
        }
        metrics.tcp_opened(labels)

    def refused(self, verdict: str, flags: str, **extra: object) -> None:
        """Closed before any byte moved (denied, or the destination failed)."""
        if self.done:
            return
        self.done = True
        labels = self.labels
        if labels.response_flags != flags:
            # Istio labels the closed counter with the flag the connection ended with.
            labels = dataclasses.replace(labels, response_flags=flags)
        self.metrics.tcp_closed(labels, 0, 0)
        record = {**self.record, **extra}
        log_access(
            AccessRecord(
                **record,  # type: ignore[arg-type]
                bytes_sent=0,
                bytes_received=0,
                duration_s=time.monotonic() - self.started,
                verdict=verdict,
                response_flags=flags,
            )
        )

    def finished(self, downstream: Endpoint) -> None:
        """Spliced and now closed: bytes as seen from the downstream (caller's) side."""
        if self.done:
            return
        self.done = True
        sent, received = downstream.bytes_received, downstream.bytes_sent
        self.metrics.tcp_closed(self.labels, sent, received)
        log_access(
            AccessRecord(
                **self.record,  # type: ignore[arg-type]
                bytes_sent=sent,
                bytes_received=received,
                duration_s=time.monotonic() - self.started,
                verdict="allow",
            )
        )


def account_request(metrics: MeshMetrics, labels: ConnectionLabels, record: AccessRecord) -> None:
    """One finished (or refused) HTTP request: its metrics, then its access-log line."""
    metrics.request_done(
        labels, record.status or 0, record.duration_s, record.bytes_sent, record.bytes_received
    )
    log_access(record)
