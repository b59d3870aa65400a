"""One structured JSON line per connection or request, on logger "mesh.access".

Written once at close (never per chunk), so the cost is one `json.dumps` per connection. The
field names mirror Istio's access-log vocabulary so the lines are familiar to read and query.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("mesh.access")

__all__ = ["AccessRecord", "log_access"]


@dataclass(frozen=True, slots=True)
class AccessRecord:
    src: str  # "ip:port"
    dst: str
    src_identity: str | None
    dst_identity: str | None
    service: str | None
    bytes_sent: int  # toward the destination
    bytes_received: int
    duration_s: float
    verdict: str  # "allow" / "deny" / "error"
    response_flags: str = "-"
    policy: str | None = None
    mtls: bool = False
    protocol: str = "tcp"
    method: str | None = None
    path: str | None = None
    status: int | None = None
    reporter: str = "destination"
    # L7 policy: the AUDIT policy that matched, and a dry-run policy's would-be result
    # ("shadow_allowed"/"shadow_denied") with its name. Written only when set.
    audit_policy: str | None = None
    shadow: str | None = None
    shadow_policy: str | None = None
    # the request's trace (W3C ids: the span this proxy recorded and its parent), and why a
    # retry or a mirror the route asked for did not happen; left out of the line when unset
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    retry_skipped: str | None = None
    mirror_skipped: str | None = None

    def to_json(self) -> str:
        d = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reporter": self.reporter,
            "protocol": self.protocol,
            "src.addr": self.src,
            "dst.addr": self.dst,
            "src.identity": self.src_identity,
            "dst.identity": self.dst_identity,
            "dst.service": self.service,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_received,
            "duration_ms": round(self.duration_s * 1000.0, 3),
            "verdict": self.verdict,
            "response_flags": self.response_flags,
            "policy": self.policy,
            "mtls": self.mtls,
        }
        if self.protocol != "tcp":
            d.update(method=self.method, path=self.path, status=self.status)
        if self.audit_policy is not None:
            d.update(audited=True, audit_policy=self.audit_policy)
        if self.shadow is not None:
            d.update(shadow_result=self.shadow, shadow_policy=self.shadow_policy)
        if self.trace_id is not None:
            d.update(trace_id=self.trace_id, span_id=self.span_id)
            if self.parent_span_id is not None:
                d["parent_span_id"] = self.parent_span_id
        if self.retry_skipped is not None:
            d["retry_skipped"] = self.retry_skipped
        if self.mirror_skipped is not None:
            d["mirror_skipped"] = self.mirror_skipped
        return json.dumps(d, separators=(",", ":"))


def log_access(record: AccessRecord) -> None:
    """Emit the line if the access logger is enabled (skip the JSON work otherwise)."""
    if log.isEnabledFor(logging.INFO):
        log.info(record.to_json())
