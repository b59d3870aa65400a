"""Per-connection and per-request telemetry, the same for both proxies.

One metric update, one access-log line and one flow (`mesh.flows`, when the process keeps a
flow ring) per connection (`Accounting`) or per request (`account_request`), never per chunk.
Both proxies report through here so a connection counted by ztunnel and a request counted by
the waypoint carry the same labels and log fields.
"""

from __future__ import annotations

import dataclasses
import time

from mesh.accesslog import AccessRecord, log_access
from mesh.config.model import Pod
from mesh.flows import REASONS, Flow, FlowRing
from mesh.metrics import UNKNOWN, ConnectionLabels, MeshMetrics
from mesh.stream import Endpoint


class Accounting:
    """One connection's telemetry: `opened` once, then `refused` or `finished` once."""

    __slots__ = (
        "connected_at", "destination", "done", "flows", "labels", "metrics", "record", "source",
        "src_port", "started", "upstream",
    )  # fmt: skip

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
        flows: FlowRing | None = None,
        source: Pod | None = None,
        destination: Pod | None = None,
        upstream: tuple[str, int] | None = None,
        src_port: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started = time.monotonic()
        self.connected_at = 0.0
        self.done = False
        # the flow ring (None: recording off) and the pods at either end, kept as references:
        # the flow is built once, at close, and only its JSON form is built on demand
        self.flows = flows if flows is not None and flows.size else None
        self.source = source
        self.destination = destination
        self.upstream = upstream  # where it went after service resolution (flow's destination)
        self.src_port = src_port
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

    def connected(self) -> None:
        """The upstream answered: the flow's latency is the time until now."""
        self.connected_at = time.monotonic()

    def refused(
        self, verdict: str, flags: str, *, reason: str | None = None, **extra: object
    ) -> None:
        """Closed before any byte moved (denied, or the destination failed). `reason` names
        a drop more precisely than the flag does (the flow's reason: "no route")."""
        if self.done:
            return
        self.done = True
        if self.flows is not None:
            denied = verdict == "deny"
            self._flow(
                "DENIED" if denied else "DROPPED",
                None if denied else (reason or REASONS.get(flags, flags)),
                0,
                0,
            )
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
        if self.flows is not None:
            self._flow("FORWARDED", None, sent, received)
        log_access(
            AccessRecord(
                **self.record,  # type: ignore[arg-type]
                bytes_sent=sent,
                bytes_received=received,
                duration_s=time.monotonic() - self.started,
                verdict="allow",
            )
        )

    def _flow(self, verdict: str, reason: str | None, sent: int, received: int) -> None:
        """Two clock reads and a tuple now; the Flow itself when a reader asks for it."""
        assert self.flows is not None
        self.flows.record_lazy(
            self._build, verdict, reason, sent, received, time.time(), time.monotonic()
        )

    def _build(
        self, verdict: str, reason: str | None, sent: int, received: int, t: float, now: float
    ) -> Flow:
        assert self.flows is not None
        rec, lb, src, dst = self.record, self.labels, self.source, self.destination
        if self.upstream is not None and self.upstream[1]:
            dst_ip, dst_port = self.upstream[0], str(self.upstream[1])
        else:
            dst_ip, _, dst_port = str(rec["dst"]).rpartition(":")
        svc = lb.destination_service_name
        return Flow(
            time=t,
            verdict=verdict,
            node=self.flows.node,
            reporter="ztunnel",
            proxy=self.flows.proxy,
            src_namespace=src.namespace if src is not None else None,
            src_pod=src.name if src is not None else None,
            src_identity=_str(rec["src_identity"]),
            src_ip=_str(rec["src"]),
            src_port=self.src_port,
            dst_namespace=dst.namespace if dst is not None else None,
            dst_pod=dst.name if dst is not None else None,
            dst_identity=_str(rec["dst_identity"]),
            dst_ip=dst_ip,
            dst_port=int(dst_port) if dst_port.isdigit() else None,
            dst_service=None if svc == UNKNOWN else f"{svc}.{lb.destination_service_namespace}",
            policy=_str(rec["policy"]),
            reason=reason,
            mtls=rec["mtls"] is True,
            duration_ms=(now - self.started) * 1000.0,
            latency_ms=(self.connected_at - self.started) * 1000.0 if self.connected_at else None,
            bytes_sent=sent,
            bytes_received=received,
        )


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def account_request(metrics: MeshMetrics, labels: ConnectionLabels, record: AccessRecord) -> None:
    """One finished (or refused) HTTP request: its metrics, then its access-log line."""
    metrics.request_done(
        labels, record.status or 0, record.duration_s, record.bytes_sent, record.bytes_received
    )
    log_access(record)
