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
