"""How flows print: `compact` (one line each, like `hubble observe`), `json` (the contract's
objects, one per line, for jq) and `table` (aligned columns, for a terminal)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from mesh.flows import Flow

__all__ = ["FORMATS", "compact", "render", "table"]

FORMATS = ("compact", "json", "table")


def _safe(text: str) -> str:
    """Names, paths and identities come from pods and peers: never let one write terminal
    control sequences (ESC, CR, ...) to the operator's screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _stamp(t: float) -> str:
    return time.strftime("%b %d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _end(ns: str | None, pod: str | None, ip: str | None, port: int | None) -> str:
    where = f"{ns}/{pod}" if pod else (ip or "?")
    return f"{where}:{port}" if port else where


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}ms" if v < 1000 else f"{v / 1000:.2f}s"


def _kind(f: Flow) -> str:
    if f.method is not None or f.status is not None:
        return "grpc-request" if f.protocol == "grpc" else "http-request"
    return "tcp"


def _verdict(f: Flow) -> str:
    out = f"{f.verdict} ({'mTLS' if f.mtls else 'plaintext'})"
    if f.verdict == "DENIED" and f.policy:
        out += f" policy {f.policy}"
    if f.reason:
        out += f" reason {f.reason!r}" if " " in f.reason else f" reason {f.reason}"
    return out


def _l7(f: Flow) -> str:
    if f.method is None and f.status is None:
        return ""
    parts = [f.method or "", f.path or ""]
    if f.status is not None:
        parts += ["=>", str(f.status)]
    if f.grpc_status is not None:
        parts.append(f"grpc-status {f.grpc_status}")
    return " ".join(p for p in parts if p)


def compact(f: Flow) -> str:
    """`Nov 30 03:12:45.123: default/sleep:43210 (ID spiffe://...) -> default/httpbin:8080
    (service httpbin.default) http-request FORWARDED (mTLS) GET /get => 200 1.2ms`"""
    src = _end(f.src_namespace, f.src_pod, f.src_ip, f.src_port)
    if f.src_identity:
        src += f" (ID {f.src_identity})"
    dst = _end(f.dst_namespace, f.dst_pod, f.dst_ip, f.dst_port)
    if f.dst_service and not f.dst_pod:
        dst = f"{dst} (service {f.dst_service})"
    parts = [f"{_stamp(f.time)}:", src, "->", dst, _kind(f), _verdict(f)]
    l7 = _l7(f)
    if l7:
        parts.append(l7)
    parts.append(_ms(f.duration_ms))
    return _safe(" ".join(parts))


def table(flows: Iterable[Flow]) -> str:
    rows: list[tuple[str, ...]] = [
        ("TIME", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY", "DURATION")
    ]
    for f in flows:
        dst = _end(f.dst_namespace, f.dst_pod, f.dst_ip, f.dst_port)
        summary = _l7(f) or (f"{f.bytes_sent}B -> {f.bytes_received}B <-")
        verdict = f.verdict + ("" if f.mtls else " (plaintext)")
        if f.policy and f.verdict == "DENIED":
            verdict += f" {f.policy}"
        if f.reason:
            verdict += f" ({f.reason})"
        row = (_stamp(f.time), _end(f.src_namespace, f.src_pod, f.src_ip, f.src_port),
               dst, _kind(f), verdict, summary, _ms(f.duration_ms))  # fmt: skip
        rows.append(tuple(_safe(c) for c in row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render(flows: Iterable[Flow], fmt: str) -> str:
    """All of `flows` in `fmt`, one string (no trailing newline); empty input, empty string
    (a table keeps its header)."""
    if fmt == "table":
        return table(flows)
    if fmt == "json":
        return "\n".join(json.dumps(f.to_dict(), separators=(",", ":")) for f in flows)
    return "\n".join(compact(f) for f in flows)
