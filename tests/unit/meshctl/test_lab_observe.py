"""Judging flows from ztunnel's telemetry text."""

from __future__ import annotations

from meshctl.lab.observe import connections, parse_metrics, records_from

WEB = 'source_principal="spiffe://cluster.local/ns/shop/sa/web"'
MTLS = 'connection_security_policy="mutual_tls"'
OPENED = "istio_tcp_connections_opened_total"
METRICS = "\n".join(
    [
        f"# HELP {OPENED} x",
        f"# TYPE {OPENED} counter",
        f'{OPENED}{{reporter="destination",{WEB},{MTLS}}} 3.0',
        f'{OPENED}{{reporter="destination",source_principal="unknown",'
        'connection_security_policy="none"} 2.0',
        f'{OPENED}{{reporter="source",{WEB},{MTLS}}} 3.0',
        f'istio_tcp_connections_closed_total{{reporter="destination",{WEB},{MTLS}}} 3.0',
        "weird_line_without_value",
    ]
)


def test_counts_only_matching_destination_samples() -> None:
    s = parse_metrics(METRICS)
    assert connections(s, source_principal_suffix="/ns/shop/sa/web", security="mutual_tls") == 3
    assert connections(s, source_principal_suffix="/ns/shop/sa/batch") == 0
    assert connections(s, security="none") == 2
    assert connections(s, reporter=None, security="mutual_tls") == 6


def test_label_values_with_escaped_quotes() -> None:
    (s,) = parse_metrics('m{a="x\\"y",b="z"} 1\n')
    assert s.labels == {"a": 'x"y', "b": "z"} and s.value == 1.0


def test_records_from_matches_source_ip_exactly() -> None:
    recs = [{"src.addr": "10.244.1.2:5"}, {"src.addr": "10.244.1.20:5"}, {"dst.addr": "x"}]
    assert records_from(recs, "10.244.1.2") == [recs[0]]
