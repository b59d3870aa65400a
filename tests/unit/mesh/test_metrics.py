"""Metrics under Istio's names, read back from the registry's own text exposition."""

from __future__ import annotations

import json
import logging
from types import MappingProxyType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.accesslog import AccessRecord, log_access
from mesh.config.model import Pod, Service, ServicePort
from mesh.metrics import ConnectionLabels, MeshMetrics

SRC = Pod(
    "shop",
    "web-7d9f8-abcde",
    "10.0.1.5",
    "n1",
    "web",
    MappingProxyType({"app": "web", "version": "v1"}),
)
DST = Pod("shop", "db-0", "10.0.2.5", "n2", "db", MappingProxyType({"app": "db"}))
SVC = Service("shop", "db", "10.96.0.3", (ServicePort(5432, 5432),))


def samples(m: MeshMetrics) -> dict[tuple[str, str], float]:
    """(sample name, a compact label summary) → value."""
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            key = s.labels.get("destination_service", "") + "|" + s.labels.get("response_code", "")
            out[(s.name, key)] = s.value
    return out


def test_tcp_and_http_counters() -> None:
    m = MeshMetrics()
    other = MeshMetrics()  # own registry: nothing leaks between instances
    labels = ConnectionLabels.build(
        reporter="destination", source=SRC, destination=DST, service=SVC, mtls=True
    )
    assert labels.source_workload == "web" and labels.source_version == "v1"
    assert labels.destination_principal == "spiffe://cluster.local/ns/shop/sa/db"
    assert labels.connection_security_policy == "mutual_tls"
    m.tcp_opened(labels)
    m.tcp_opened(labels)
    m.tcp_closed(labels, sent=100, received=4000)
    m.request_done(labels, 503, 0.0125, 10, 20)
    got = samples(m)
    host = "db.shop.svc.cluster.local|"
    assert got[("istio_tcp_connections_opened_total", host)] == 2
    assert got[("istio_tcp_connections_closed_total", host)] == 1
    assert got[("istio_tcp_sent_bytes_total", host)] == 100
    assert got[("istio_tcp_received_bytes_total", host)] == 4000
    assert got[("istio_requests_total", host + "503")] == 1
    assert got[("istio_request_duration_milliseconds_sum", host + "503")] == pytest.approx(12.5)
    assert got[("istio_response_bytes_sum", host + "503")] == 20
    assert not any(k[0].startswith("istio_tcp") for k in samples(other))
    assert m._tcp_children(labels) is m._tcp_children(
        ConnectionLabels.build(
            reporter="destination", source=SRC, destination=DST, service=SVC, mtls=True
        )
    )


def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    rec = AccessRecord(
        "10.0.1.5:4321",
        "10.0.2.5:5432",
        "spiffe://cluster.local/ns/shop/sa/web",
        None,
        "db.shop.svc.cluster.local",
        100,
        4000,
        0.25,
        "deny",
        policy="shop/deny-all",
        mtls=True,
    )
    with caplog.at_level(logging.INFO, logger="mesh.access"):
        log_access(rec)
    (r,) = caplog.records
    line = json.loads(r.getMessage())
    assert line["src.addr"] == "10.0.1.5:4321" and line["verdict"] == "deny"
    assert line["policy"] == "shop/deny-all" and line["duration_ms"] == 250.0
    assert line["bytes_recv"] == 4000 and "status" not in line


def test_request_series_expose_what_prometheus_clients_own_types_did() -> None:
    """The request counter and histograms are kept as plain numbers and rendered at scrape
    time: the exposition must be line for line what prometheus_client's Counter and
    Histogram wrote for the same requests (bucket edges included), `_created` aside."""
    import dataclasses
    import re

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from mesh import metrics as mm

    ref = CollectorRegistry()
    names = (*mm.LABEL_NAMES, "response_code")
    counter = Counter("istio_requests", "HTTP requests", names, registry=ref)
    hists = [
        Histogram(n, doc, names, buckets=b, registry=ref)
        for n, doc, b in (
            ("istio_request_duration_milliseconds", "HTTP request duration", mm._DURATION_BUCKETS),
            ("istio_request_bytes", "HTTP request sizes", mm._SIZE_BUCKETS),
            ("istio_response_bytes", "HTTP response sizes", mm._SIZE_BUCKETS),
        )
    ]
    m = MeshMetrics()
    a = ConnectionLabels.build(reporter="waypoint", source=SRC, destination=DST, service=SVC,
                               protocol="http", mtls=True)  # fmt: skip
    b = ConnectionLabels(reporter="waypoint", request_protocol="grpc")
    # edges: exactly on a bound, just over it, zero, past the last bound
    cases = [(a, 200, 0.0005, 0, 10), (a, 200, 0.001, 1, 11), (a, 200, 0.0010001, 100, 0),
             (a, 503, 45.0, 10**8, 1000), (b, 200, 0.0, 100000, 100001),
             (a, 200, 0.004, 7, 7)]  # fmt: skip
    for labels, code, dur, req, resp in cases:
        m.request_done(labels, code, dur, req, resp)
        values = (*dataclasses.astuple(labels), str(code))
        counter.labels(*values).inc()
        for h, v in zip(hists, (dur * 1000.0, req, resp), strict=True):
            h.labels(*values).observe(v)

    def text(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        keep = ("istio_request", "# HELP istio_re", "# TYPE istio_re")
        out = [re.sub(r"(_created\{.*\}) .*", r"\1 T", x) for x in lines if x.startswith(keep)]
        return sorted(out)

    assert text(m.registry) == text(ref)
    assert len(text(ref)) > 100
