"""Flow records shaped like the demo's (deploy/examples/demo.yaml), as the flow stream serves them.

The shop namespace's three callers of `server.shop` (one of them denied by
`shop/no-batch-to-server`, one from outside the mesh in plaintext), bookinfo's productpage
calling `reviews` through a waypoint (so both ztunnel and the waypoint report it, some requests
failing with 503), a flow dropped for want of a route, and a caller whose pod name is markup: the
map and the UI are tested on what a real lab and a hostile pod produce, without a lab.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HOSTILE_POD = "<img src=x onerror=window.__xss=1>"
DENY_POLICY = "shop/no-batch-to-server"
T0 = datetime(2026, 11, 30, 3, 12, 40, tzinfo=UTC)


def _time(offset_s: float) -> str:
    return (
        (T0 + timedelta(seconds=offset_s)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def flow(
    offset_s: float,
    src: tuple[str, str, str],
    dst: tuple[str, str | None, str, int, str | None],
    *,
    verdict: str = "FORWARDED",
    mtls: bool = True,
    reporter: str = "ztunnel",
    l7: dict[str, Any] | None = None,
    policy: str | None = None,
    reason: str | None = None,
    latency_ms: float = 1.5,
    src_port: int = 40000,
    proxy: str | None = None,
) -> dict[str, Any]:
    """One record in the shared flow shape; `src` is (namespace, pod, ip), `dst` (namespace,
    pod, ip, port, service)."""
    s_ns, s_pod, s_ip = src
    d_ns, d_pod, d_ip, d_port, service = dst
    return {
        "time": _time(offset_s),
        "node": "node1",
        "reporter": reporter,
        "proxy": proxy or ("waypoint-bookinfo" if reporter == "waypoint" else "ztunnel-node1"),
        "source": {
            "namespace": s_ns,
            "pod": s_pod,
            "identity": f"spiffe://cluster.local/ns/{s_ns}/sa/{s_pod}",
            "ip": s_ip,
            "port": src_port,
        },
        "destination": {
            "namespace": d_ns,
            "pod": d_pod,
            "identity": f"spiffe://cluster.local/ns/{d_ns}/sa/{d_pod}" if d_pod else None,
            "ip": d_ip,
            "port": d_port,
            "service": service,
        },
        "protocol": "http/1.1" if l7 else "tcp",
        "l7": l7,
        "verdict": verdict,
        "policy": policy,
        "reason": reason,
        "mtls": mtls,
        "duration_ms": latency_ms + 0.5,
        "latency_ms": latency_ms,
        "bytes_sent": 120,
        "bytes_received": 300 if verdict == "FORWARDED" else 0,
    }


WEB = ("shop", "web", "10.10.1.2")
BATCH = ("shop", "batch", "10.10.1.3")
CURL = ("legacy", "curl", "10.10.2.2")
EVIL = ("shop", HOSTILE_POD, "10.10.1.9")
PRODUCTPAGE = ("bookinfo", "productpage", "10.10.3.2")
SERVER = ("shop", "server", "10.10.1.4", 8080, "server.shop")
REVIEWS_V1 = ("bookinfo", "reviews-v1", "10.10.3.3", 9080, "reviews.bookinfo")
REVIEWS_V2 = ("bookinfo", "reviews-v2", "10.10.3.4", 9080, "reviews.bookinfo")
NO_ROUTE = ("shop", None, "10.96.0.99", 80, None)


def demo_flows() -> list[dict[str, Any]]:
    """Twenty seconds of the demo's traffic (rates are over that span)."""
    flows: list[dict[str, Any]] = []
    for i in range(10):  # web -> server: 10 mTLS connections, latencies 1..10 ms
        flows.append(flow(i * 2, WEB, SERVER, latency_ms=float(i + 1), src_port=41000 + i))
    for i in range(2):  # batch -> server: denied by policy
        flows.append(
            flow(
                1 + i,
                BATCH,
                SERVER,
                verdict="DENIED",
                policy=DENY_POLICY,
                latency_ms=0.3,
                src_port=42000 + i,
            )
        )
    for i in range(4):  # legacy/curl -> server, from outside the mesh
        flows.append(flow(3 + i, CURL, SERVER, mtls=False, src_port=43000 + i))
    for i in range(4):  # productpage -> reviews through the waypoint: 1 of 4 fails
        backend = REVIEWS_V1 if i % 2 == 0 else REVIEWS_V2
        status = 503 if i == 3 else 200
        l7 = {
            "method": "GET",
            "authority": "reviews.bookinfo:9080",
            "path": f"/reviews/{i}",
            "status": status,
            "grpc_status": None,
        }
        flows.append(flow(5 + i, PRODUCTPAGE, backend, reporter="waypoint", l7=l7, latency_ms=4.0))
        flows.append(flow(5 + i, PRODUCTPAGE, backend, src_port=44000 + i))
    flows.append(flow(19, WEB, NO_ROUTE, verdict="DROPPED", reason="no route", src_port=45000))
    flows.append(flow(20, EVIL, SERVER, src_port=46000))
    flows.sort(key=lambda f: str(f["time"]))
    return flows


def lab_demo_flows() -> list[dict[str, Any]]:
    """Flows a real lab recorded (`meshctl observe --lab ... -o json` over deploy/examples/
    demo.yaml; web, batch (denied), legacy/curl and productpage each calling their Service):
    what the proxies really report, e.g. both ends of one connection, the Service known only
    at the caller's end and the denying policy only at the deciding end."""
    path = Path(__file__).with_name("lab_demo_flows.ndjson")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
