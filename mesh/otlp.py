"""Spans out to an OpenTelemetry collector: OTLP/gRPC `TraceService/Export`, batched, from a
thread of its own.

The request path only appends a finished `Span` (a small frozen record) to a bounded queue and
never waits: when the queue is full the span is dropped and counted, so a slow or dead
collector costs the proxy nothing but those spans. The exporter thread turns spans into
protobuf (that work stays off the event loop too), sends a batch when it is full or a second
old, and counts what it exported and what the collector refused or never got, in
`ambientmesh_trace_spans_total{outcome}`.

The protobuf classes come from `opentelemetry-proto` and the client from `grpcio`: both are the
optional extra `otlp` (`pip install ambientmesh[otlp]`), imported only when an exporter starts,
so a proxy without a collector carries neither; without them `start` names the extra to
install.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("mesh.otlp")

__all__ = [
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_SERVER",
    "OtlpExporter",
    "OtlpUnavailable",
    "Span",
    "require",
]

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3

Attr = tuple[str, str | int | bool]
MAX_CACHED_ATTRIBUTES = 8192


class OtlpUnavailable(RuntimeError):
    """The optional dependencies of the exporter are not installed."""


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str  # hex, as in traceparent
    span_id: str
    parent_id: str | None
    tracestate: str | None
    name: str
    kind: int
    start_ns: int  # unix epoch nanoseconds
    end_ns: int
    attributes: tuple[Attr, ...]
    error: bool = False


def _load() -> tuple[Any, Any, Any, Any, Any]:
    try:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2
    except ImportError as exc:
        raise OtlpUnavailable(
            f"OTLP export needs the 'otlp' extra (opentelemetry-proto and grpcio): "
            f"pip install 'ambientmesh[otlp]' ({exc})"
        ) from None
    return grpc, trace_service_pb2, trace_service_pb2_grpc, common_pb2, (resource_pb2, trace_pb2)


def require() -> None:
    """Raise OtlpUnavailable, naming the extra to install, unless the exporter can run: a
    process checks this at start, before it serves anything."""
    _load()


class OtlpExporter:
    """One collector, one thread, one bounded queue."""

    def __init__(
        self,
        endpoint: tuple[str, int],
        *,
        resource: Mapping[str, str],
        registry: CollectorRegistry | None = None,
        scope: str = "ambientmesh",
        max_queue: int = 4096,
        max_batch: int = 512,
        interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.resource = dict(resource)
        self.scope = scope
        self.max_batch = max_batch
        self.interval = interval
        self.timeout = timeout
        self._q: queue.Queue[Span | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._mods: tuple[Any, ...] | None = None
        # KeyValue messages by (key, value, type): most attribute values repeat from span to
        # span (methods, identities, services, clusters), and building the message is most
        # of what a span costs the exporter thread (measured: 29 -> 8 us per span of 14).
        self._kvs: dict[tuple[str, object, type], Any] = {}
        self.spans_c = Counter(
            "ambientmesh_trace_spans",
            "Spans by fate: exported, dropped_queue_full, dropped_export_failed",
            ("outcome",),
            registry=registry,
        )
        self._exported = self.spans_c.labels("exported")
        self._full = self.spans_c.labels("dropped_queue_full")
        self._failed = self.spans_c.labels("dropped_export_failed")

    def start(self) -> None:
        """Load the protobuf/gRPC modules (OtlpUnavailable without them), start the thread."""
        self._mods = _load()
        self._thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)
        self._thread.start()

    def submit(self, span: Span) -> None:
        """Never blocks: a full queue drops the span (counted)."""
        try:
            self._q.put_nowait(span)
        except queue.Full:
            self._full.inc()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within `timeout`), then stop the thread."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._q.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
        self._thread = None

    # -- the exporter thread -------------------------------------------------------------------

    def _run(self) -> None:
        assert self._mods is not None
        grpc, _svc, svc_grpc, _common, _ = self._mods
        host, port = self.endpoint
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # The collector is addressed directly: a proxy from the environment (http_proxy) is
        # for the node's egress, not for telemetry that stays in the cluster.
        channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        stub = svc_grpc.TraceServiceStub(channel)
        stopping = False
        try:
            while not stopping:
                batch: list[Span] = []
                flush_at = time.monotonic() + self.interval
                while len(batch) < self.max_batch:
                    try:
                        item = self._q.get(timeout=max(0.0, flush_at - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:  # `close`: what was queued before it is in `batch`
                        stopping = True
                        break
                    batch.append(item)
                if batch:
                    self._export(stub, batch)
        finally:
            channel.close()

    def _export(self, stub: Any, batch: Sequence[Span]) -> None:
        try:
            resp = stub.Export(self.request(batch), timeout=self.timeout)
        except Exception as exc:  # grpc.RpcError and whatever the channel raises
            self._failed.inc(len(batch))
            log.warning("OTLP export of %d spans to %s failed: %s", len(batch), self.endpoint, exc)
            return
        rejected = 0
        if resp.HasField("partial_success"):
            rejected = min(len(batch), int(resp.partial_success.rejected_spans))
            if rejected:
                log.warning(
                    "OTLP collector rejected %d spans: %s",
                    rejected,
                    resp.partial_success.error_message,
                )
        self._failed.inc(rejected)
        self._exported.inc(len(batch) - rejected)

    def request(self, batch: Sequence[Span]) -> Any:
        """The `ExportTraceServiceRequest` for `batch` (one resource, one scope)."""
        assert self._mods is not None
        _grpc, svc, _svc_grpc, common, (resource_pb2, trace_pb2) = self._mods

        cache = self._kvs

        def kv(k: str, v: str | int | bool) -> Any:
            ck = (k, v, type(v))  # True and 1 are equal keys otherwise
            m = cache.get(ck)
            if m is not None:
                return m
            if isinstance(v, bool):
                m = common.KeyValue(key=k, value=common.AnyValue(bool_value=v))
            elif isinstance(v, int):
                m = common.KeyValue(key=k, value=common.AnyValue(int_value=v))
            else:
                m = common.KeyValue(key=k, value=common.AnyValue(string_value=v))
            if len(cache) >= MAX_CACHED_ATTRIBUTES:
                cache.clear()  # paths and addresses vary: never grow without bound
            cache[ck] = m
            return m

        error = trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR)
        unset = trace_pb2.Status()
        spans = [
            trace_pb2.Span(
                trace_id=bytes.fromhex(s.trace_id),
                span_id=bytes.fromhex(s.span_id),
                parent_span_id=bytes.fromhex(s.parent_id) if s.parent_id else b"",
                trace_state=s.tracestate or "",
                name=s.name,
                kind=s.kind,
                start_time_unix_nano=s.start_ns,
                end_time_unix_nano=s.end_ns,
                attributes=[kv(k, v) for k, v in s.attributes],
                status=error if s.error else unset,
            )
            for s in batch
        ]
        return svc.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=resource_pb2.Resource(
                        attributes=[kv(k, v) for k, v in self.resource.items()]
                    ),
                    scope_spans=[
                        trace_pb2.ScopeSpans(
                            scope=common.InstrumentationScope(name=self.scope), spans=spans
                        )
                    ],
                )
            ]
        )
