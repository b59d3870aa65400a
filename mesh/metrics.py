"""Istio-named Prometheus metrics shared by ztunnel and the waypoint.

Names and labels are Istio's so existing dashboards work. Callers report once per connection or
request (`tcp_opened`, `tcp_closed`, `request_done`), never per chunk: proxies count bytes in
plain ints and hand the totals over at close. `.labels(...)` is slow (it hashes and validates
every label), so label children are cached per `ConnectionLabels` object value.

Each `MeshMetrics` owns its own CollectorRegistry: several proxies (and tests) live in one
process and must not share counters.
"""

from __future__ import annotations

import math
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import astuple, dataclass, field, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mesh.config.model import Pod, Service

__all__ = ["UNKNOWN", "ConnectionLabels", "KernelDropCounts", "MeshMetrics"]


class _KtlsConnections(Collector):
    """`ambientmesh_ktls_connections_total{record_layer}`, read from the kTLS module's own
    counts at scrape time (nothing per connection here; 0 where kTLS was never used)."""

    def collect(self) -> Iterator[Metric]:
        ktls = sys.modules.get("mesh.ktls")
        counts = getattr(ktls, "COUNTS", None)
        c = CounterMetricFamily(
            "ambientmesh_ktls_connections",
            "TLS connections by where their records are handled: kernel (kTLS) or user "
            "space (the kernel refused the keys)",
            labels=["record_layer"],
        )
        c.add_metric(["kernel"], getattr(counts, "kernel", 0))
        c.add_metric(["user_space"], getattr(counts, "user_space", 0))
        yield c


@dataclass(frozen=True, slots=True)
class KernelDropCounts:
    """Totals of the connects the kernel refused (ztunnel reads them from a BPF map)."""

    denied: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (policy, direction)
    drops: Mapping[str, int] = field(default_factory=dict)  # reason


class _KernelDrops(Collector):
    """`ambientmesh_kernel_denied_total{policy,direction}` and
    `ambientmesh_kernel_drops_total{reason}`, read at scrape time from `source` (the counts
    live in a BPF map that outlives the process, so they are never kept here)."""

    def __init__(self) -> None:
        self.source: Callable[[], KernelDropCounts] | None = None

    def collect(self) -> Iterator[Metric]:
        denied = CounterMetricFamily(
            "ambientmesh_kernel_denied",
            "Connects refused at connect() by a NetworkPolicy or CiliumNetworkPolicy",
            labels=["policy", "direction"],
        )
        drops = CounterMetricFamily(
            "ambientmesh_kernel_drops",
            "Connects refused in the kernel, by reason (policy-denied, ztunnel-unavailable)",
            labels=["reason"],
        )
        counts = self.source() if self.source is not None else KernelDropCounts()
        for (policy, direction), n in sorted(counts.denied.items()):
            denied.add_metric([policy, direction], n)
        for reason, n in sorted(counts.drops.items()):
            drops.add_metric([reason], n)
        yield denied
        yield drops


UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """Istio's standard TCP/HTTP label set. Hashable, so it keys the children cache."""

    reporter: str = "destination"
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = "none"

    @classmethod
    def build(
        cls,
        *,
        reporter: str,
        source: Pod | None = None,
        source_principal: str | None = None,
        destination: Pod | None = None,
        destination_principal: str | None = None,
        service: Service | None = None,
        protocol: str = "tcp",
        mtls: bool = False,
        response_flags: str = "-",
        trust_domain: str = "cluster.local",
    ) -> ConnectionLabels:
        """Labels from what a proxy knows. Workload names follow Istio: the pod's `app`
        label (canonical service) or, failing that, the pod name without its hash suffixes."""

        def workload(p: Pod) -> str:
            parts = p.name.rsplit("-", 2)
            return parts[0] if len(parts) == 3 else p.name

        def canonical(p: Pod) -> str:
            lb = p.labels
            return lb.get("service.istio.io/canonical-name") or lb.get("app") or workload(p)

        def version(p: Pod) -> str:
            lb = p.labels
            return lb.get("service.istio.io/canonical-revision") or lb.get("version") or "latest"

        s, d = source, destination
        return cls(
            reporter=reporter,
            source_workload=workload(s) if s else UNKNOWN,
            source_canonical_service=canonical(s) if s else UNKNOWN,
            source_workload_namespace=s.namespace if s else UNKNOWN,
            source_principal=source_principal
            or (s.identity(trust_domain) if s and mtls else UNKNOWN),
            source_app=canonical(s) if s else UNKNOWN,
            source_version=version(s) if s else UNKNOWN,
            destination_workload=workload(d) if d else UNKNOWN,
            destination_workload_namespace=d.namespace if d else UNKNOWN,
            destination_principal=destination_principal
            or (d.identity(trust_domain) if d and mtls else UNKNOWN),
            destination_app=canonical(d) if d else UNKNOWN,
            destination_version=version(d) if d else UNKNOWN,
            destination_service=service.hostname if service else UNKNOWN,
            destination_service_namespace=service.namespace if service else UNKNOWN,
            destination_service_name=service.name if service else UNKNOWN,
            request_protocol=protocol,
            response_flags=response_flags,
            connection_security_policy="mutual_tls" if mtls else "none",
        )


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ConnectionLabels))
_HTTP_LABELS = (*LABEL_NAMES, "response_code")
# Istio's default buckets for request duration (ms) and sizes (bytes).
_DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
_SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)


class _RequestSeries:
    """One label set's request counts: per-bucket (not cumulative) counts, the last one +Inf.
    A bucket holds the observations up to and including its bound, as Prometheus' `le`."""

    __slots__ = (
        "count", "created", "duration", "duration_sum", "req", "req_sum", "resp",
        "resp_sum", "values",
    )  # fmt: skip

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.created = time.time()
        self.count = 0
        self.duration_sum = 0.0
        self.req_sum = 0
        self.resp_sum = 0
        self.duration = [0] * (len(_DURATION_BUCKETS) + 1)
        self.req = [0] * (len(_SIZE_BUCKETS) + 1)
        self.resp = [0] * (len(_SIZE_BUCKETS) + 1)


def _le(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """Bucket bounds as prometheus_client writes them in `le` (1 → "1.0", 1e7 → "1e+07")."""
    go: Callable[[float], str] = floatToGoString
    return tuple(go(b) for b in (*bounds, math.inf))


def _cumulative(le: tuple[str, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    n = 0
    for bound, c in zip(le, counts, strict=True):
        n += c
        out.append((bound, float(n)))
    return out


_DURATION_LE = _le(_DURATION_BUCKETS)
_SIZE_LE = _le(_SIZE_BUCKETS)


class _HttpRequests(Collector):
    """`istio_requests_total` and the request duration and size histograms, exactly as
    prometheus_client's Counter and Histogram expose them (`_total`/`_created`, `_bucket`,
    `_count`, `_sum`, `_created`), from counts the proxy keeps in plain numbers."""

    def __init__(self) -> None:
        self.series: dict[tuple[ConnectionLabels, int], _RequestSeries] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("istio_requests", "HTTP requests", labels=_HTTP_LABELS)
        hists = [
            HistogramMetricFamily(name, doc, labels=_HTTP_LABELS)
            for name, doc in (
                ("istio_request_duration_milliseconds", "HTTP request duration"),
                ("istio_request_bytes", "HTTP request sizes"),
                ("istio_response_bytes", "HTTP response sizes"),
            )
        ]
        for st in list(self.series.values()):
            requests.add_metric(st.values, st.count, created=st.created)
            lb = dict(zip(_HTTP_LABELS, st.values, strict=True))
            for h, bounds, counts, total in (
                (hists[0], _DURATION_LE, st.duration, st.duration_sum),
                (hists[1], _SIZE_LE, st.req, st.req_sum),
                (hists[2], _SIZE_LE, st.resp, st.resp_sum),
            ):
                h.add_metric(st.values, _cumulative(bounds, counts), float(total))
                h.add_sample(h.name + "_created", lb, st.created)
        yield requests
        yield from hists


class MeshMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends "_total" to counter names itself.
        self.tcp_opened_c = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABEL_NAMES, registry=r
        )
        self.tcp_closed_c = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABEL_NAMES, registry=r
        )
        self.tcp_sent_c = Counter(
            "istio_tcp_sent_bytes", "Bytes sent to the destination", LABEL_NAMES, registry=r
        )
        self.tcp_received_c = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            LABEL_NAMES,
            registry=r,
        )
        # The four per-request series are plain numbers here, rendered at scrape time: through
        # prometheus_client's Counter and Histograms each request cost four lock round trips
        # and a bucket scan per histogram (8 us of the waypoint's per-request CPU; 1.1 now).
        self._http_stats = _HttpRequests()
        r.register(self._http_stats)
        self.ktls_enabled = Gauge(
            "ambientmesh_ktls_enabled", "1 when TLS records are handled by the kernel", registry=r
        )
        r.register(_KtlsConnections())
        self.info = Gauge(
            "ambientmesh_build_info",
            "Proxy role and version",
            ("component", "version"),
            registry=r,
        )
        # Work a proxy refused to protect itself (a limit reached, a self-loop): by reason.
        self.refused_c = Counter(
            "ambientmesh_refused", "Work refused by a limit or a guard", ("reason",), registry=r
        )
        # NetworkPolicy / CiliumNetworkPolicy denials, by the policy that isolates the pod,
        # the direction, and where it was enforced (ztunnel before a dial, or the kernel).
        self.policy_denied_c = Counter(
            "ambientmesh_policy_denied",
            "Connections denied by a NetworkPolicy or CiliumNetworkPolicy",
            ("policy", "direction", "enforcement"),
            registry=r,
        )
        self.kernel_drops = _KernelDrops()
        r.register(self.kernel_drops)
        # The waypoint's own: created with the rest so every registry has them (tests build
        # several handlers on one MeshMetrics) and a scrape of a proxy that never used them
        # shows them at zero. ztunnel never increments them.
        self.waypoint_refused_c = Counter(
            "ambientmesh_waypoint_refused",
            "Requests, streams and connections the waypoint refused past a limit or as malformed",
            ("reason", "response_flags"),
            registry=r,
        )
        # Requests an AUDIT AuthorizationPolicy matched, by policy.
        self.waypoint_audited_c = Counter(
            "ambientmesh_waypoint_audited_requests",
            "Requests matched by an AUDIT AuthorizationPolicy (the decision is unaffected)",
            ("policy",),
            registry=r,
        )
        # Would-be results of dry-run policies (Envoy's istio_dry_run_* shadow stats), by the
        # dry-run policy that matched ("-" when none did) and result.
        self.waypoint_dry_run_c = Counter(
            "ambientmesh_waypoint_dry_run_requests",
            "Requests evaluated against dry-run AuthorizationPolicies (never enforced)",
            ("policy", "result"),
            registry=r,
        )
        self._tcp: dict[ConnectionLabels, tuple[Any, Any, Any, Any]] = {}

    def _tcp_children(self, labels: ConnectionLabels) -> tuple[Any, Any, Any, Any]:
        ch = self._tcp.get(labels)
        if ch is None:
            values = astuple(labels)
            ch = (
                self.tcp_opened_c.labels(*values),
                self.tcp_closed_c.labels(*values),
                self.tcp_sent_c.labels(*values),
                self.tcp_received_c.labels(*values),
            )
            self._tcp[labels] = ch
        return ch

    def tcp_opened(self, labels: ConnectionLabels) -> None:
        self._tcp_children(labels)[0].inc()

    def tcp_closed(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """`sent`: bytes toward the destination; `received`: bytes back from it."""
        _, closed, tx, rx = self._tcp_children(labels)
        closed.inc()
        if sent:
            tx.inc(sent)
        if received:
            rx.inc(received)

    def request_done(
        self,
        labels: ConnectionLabels,
        code: int,
        duration_s: float,
        req_bytes: int,
        resp_bytes: int,
    ) -> None:
        key = (labels, code)
        st = self._http_stats.series.get(key)
        if st is None:
            st = self._http_stats.series[key] = _RequestSeries((*astuple(labels), str(code)))
        st.count += 1
        ms = duration_s * 1000.0
        st.duration_sum += ms
        st.duration[bisect_left(_DURATION_BUCKETS, ms)] += 1
        st.req_sum += req_bytes
        st.req[bisect_left(_SIZE_BUCKETS, req_bytes)] += 1
        st.resp_sum += resp_bytes
        st.resp[bisect_left(_SIZE_BUCKETS, resp_bytes)] += 1

    def refused(self, reason: str) -> None:
        self.refused_c.labels(reason).inc()

    def policy_denied(self, policy: str, direction: str, enforcement: str) -> None:
        self.policy_denied_c.labels(policy, direction, enforcement).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format, for `/metrics`."""
        return generate_latest(self.registry)
