"""Reading what ztunnel reports (Prometheus text, JSON access-log lines) to judge a flow.

The demo and the tests decide "was it mutual TLS" and "was it denied" from ztunnel's own
telemetry, the same signals an operator's dashboard shows, not from the lab's expectations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in
                  _LABEL.findall(m.group(3) or "")}  # fmt: skip
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append(Sample(m.group(1), labels, value))
    return out


def connections(
    samples: Iterable[Sample],
    *,
    source_principal_suffix: str | None = None,
    security: str | None = None,
    reporter: str | None = "destination",
) -> float:
    """Sum of istio_tcp_connections_opened_total over the matching label sets."""
    total = 0.0
    for s in samples:
        if s.name != "istio_tcp_connections_opened_total":
            continue
        lb = s.labels
        if reporter and lb.get("reporter") != reporter:
            continue
        if security and lb.get("connection_security_policy") != security:
            continue
        if source_principal_suffix and not lb.get("source_principal", "").endswith(
            source_principal_suffix
        ):
            continue
        total += s.value
    return total


def records_from(records: Iterable[Mapping[str, Any]], src_ip: str) -> list[Mapping[str, Any]]:
    """Access-log records of connections that came from `src_ip`."""
    return [r for r in records if str(r.get("src.addr", "")).rsplit(":", 1)[0] == src_ip]


def ktls_line(node: str, samples: Iterable[Sample]) -> str:
    """Whether this node's HBONE connections had their TLS records in the kernel, from the
    node's own metrics (`ambientmesh_ktls_enabled`, `ambientmesh_ktls_connections_total`)."""
    enabled, layers = 0.0, {"kernel": 0.0, "user_space": 0.0}
    for s in samples:
        if s.name == "ambientmesh_ktls_enabled":
            enabled = s.value
        elif s.name == "ambientmesh_ktls_connections_total":
            layers[s.labels.get("record_layer", "")] = s.value
    if not enabled:
        return f"kTLS on {node}: not in use (this kernel has no kTLS: user-space TLS)"
    kernel, user = int(layers["kernel"]), int(layers["user_space"])
    state = "in use" if kernel else "enabled, but no connection was offloaded"
    return (f"kTLS on {node}: {state}, {kernel} HBONE connection(s) with TLS records in the "
            f"kernel, {user} fell back to user space")  # fmt: skip
