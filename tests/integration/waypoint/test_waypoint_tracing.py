"""Traces through a real waypoint, to a real OTLP receiver.

The receiver is a grpcio server implementing the `TraceServiceServicer` generated in
`opentelemetry-proto` (what an OpenTelemetry collector serves on :4317); the waypoint's
exporter speaks OTLP/gRPC to it over loopback. Each request goes client → ztunnel → HBONE →
waypoint → HBONE → ztunnel → echo pod, and the echo's answer shows the `traceparent` the backend
received, so a test sees both halves of the hop: the span the waypoint emitted and the trace
the backend continues.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

from mesh.otlp import OtlpExporter, Span
from tests.integration.waypoint.test_waypoint_mesh import route, sample, settled
from tests.integration.waypoint.waypointkit import CLIENT_ID, NS, Mesh

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
grpc = pytest.importorskip("grpc")

from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP trace receiver: keeps every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # the generated name
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[Any, Any]]:
        """(resource, span) for every span received."""
        with self.lock:
            reqs = list(self.requests)
        return [
            (rs.resource, span)
            for req in reqs
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


def otlp_receiver() -> tuple[Receiver, Any, int]:
    """A started receiver on loopback: (servicer, grpc server to stop, port)."""
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return rec, server, port


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    rec, server, port = otlp_receiver()
    try:
        yield rec, port
    finally:
        server.stop(None).wait(5)


@pytest.fixture
def exporter(mesh: Mesh, receiver: tuple[Receiver, int]) -> Iterator[OtlpExporter]:
    exp = OtlpExporter(
        ("127.0.0.1", receiver[1]),
        resource={"service.name": f"waypoint.{NS}"},
        registry=mesh.waypoint.metrics.registry,
        interval=0.05,
    )
    exp.start()
    mesh.waypoint.handler.exporter = exp
    try:
        yield exp
    finally:
        mesh.waypoint.handler.exporter = None
        exp.close()


async def wait_spans(rec: Receiver, n: int) -> list[tuple[Any, Any]]:
    for _ in range(400):
        got = rec.spans()
        if len(got) >= n:
            return got
        await asyncio.sleep(0.025)
    raise AssertionError(f"{len(rec.spans())} spans arrived, wanted {n}")


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        out[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


def split_route() -> dict[str, Any]:
    return route("traced", [{"backendRefs": [{"name": "echo-v1", "port": 80}]}])


async def test_span_continues_the_callers_trace_and_the_backend_continues_ours(
    mesh: Mesh, receiver: tuple[Receiver, int], exporter: OtlpExporter
) -> None:
    mesh.apply([split_route()])
    r = await mesh.get(
        "/traced/path?q=1",
        headers=[("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "congo=t61rcWkgMzE")],
    )
    assert r.status == 200
    seen = r.json()["headers"]
    version, trace_id, parent, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert parent != PARENT  # the waypoint is a hop: the backend's parent is the waypoint's span
    assert seen["tracestate"] == "congo=t61rcWkgMzE"

    [(resource, span)] = await wait_spans(receiver[0], 1)
    assert span.trace_id.hex() == TRACE
    assert span.parent_span_id.hex() == PARENT
    assert span.span_id.hex() == parent
    assert span.trace_state == "congo=t61rcWkgMzE"
    assert span.kind == 2  # SPAN_KIND_SERVER
    assert span.start_time_unix_nano < span.end_time_unix_nano
    assert span.status.code == 0  # unset: a 200 is no error
    a = attrs(span)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/traced/path"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "echo"
    assert a["client.address"] == "127.0.0.1"
    assert a["source.principal"] == CLIENT_ID
    assert a["destination.principal"] == f"spiffe://cluster.local/ns/{NS}/sa/echo"
    assert a["destination.service.host"] == f"echo.{NS}.svc.cluster.local"
    assert a["route_name"] == f"{NS}/traced"
    assert a["upstream_cluster"] == f"outbound|80||echo-v1.{NS}.svc"
    assert a["upstream_address"].startswith("127.0.0.3:")
    res = {kv.key: kv.value.string_value for kv in resource.attributes}
    assert res["service.name"] == f"waypoint.{NS}"
    text = await settled(mesh)
    for _ in range(100):
        if sample(text, "ambientmesh_trace_spans_total", outcome="exported") == 1:
            break
        await asyncio.sleep(0.02)
        text = mesh.waypoint.metrics.exposition().decode()
    assert sample(text, "ambientmesh_trace_spans_total", outcome="exported") == 1


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", f"00-{TRACE.upper()}-{PARENT}-01"), ("tracestate", "a=1")],
        [("traceparent", f"00-{'0' * 32}-{PARENT}-01")],
        [("traceparent", f"00-{TRACE}-{PARENT}-01"), ("traceparent", f"00-{TRACE}-{PARENT}-01")],
        [("traceparent", "x" * 3000)],
    ],
    ids=["absent", "upper-case", "zero-trace", "twice", "huge"],
)
async def test_absent_or_malformed_traceparent_starts_a_new_trace(
    mesh: Mesh,
    receiver: tuple[Receiver, int],
    exporter: OtlpExporter,
    headers: list[tuple[str, str]],
) -> None:
    c = await mesh.client()
    try:
        # http.client folds repeated names in a dict: send them raw instead
        c.conn.putrequest("GET", "/fresh", skip_host=True)
        c.conn.putheader("host", "echo")
        for k, v in headers:
            c.conn.putheader(k, v)
        await asyncio.to_thread(c.conn.endheaders)
        resp = await asyncio.to_thread(c.conn.getresponse)
        body = await asyncio.to_thread(resp.read)
    finally:
        c.close()
    assert resp.status == 200
    seen = json.loads(body)["headers"]
    _, trace_id, parent, flags = seen["traceparent"].split("-")
    assert trace_id != TRACE and trace_id != "0" * 32 and flags == "01"
    assert "tracestate" not in seen  # never passed on without a valid traceparent
    [(_, span)] = await wait_spans(receiver[0], 1)
    assert span.trace_id.hex() == trace_id and span.span_id.hex() == parent
    assert span.parent_span_id == b""  # the waypoint started this trace


async def test_unsampled_trace_is_propagated_but_not_exported(
    mesh: Mesh, receiver: tuple[Receiver, int], exporter: OtlpExporter
) -> None:
    r = await mesh.get("/quiet", headers=[("traceparent", f"00-{TRACE}-{PARENT}-00")])
    _, trace_id, _, flags = r.json()["headers"]["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE, "00")
    await mesh.get("/loud", headers=[("traceparent", f"00-{TRACE}-{PARENT}-01")])
    got = await wait_spans(receiver[0], 1)
    await asyncio.sleep(0.2)  # past a batch interval: an unsampled span would be there now
    assert (
        [attrs(s)["url.path"] for _, s in receiver[0].spans()]
        == ["/loud"]
        == [attrs(s)["url.path"] for _, s in got]
    )


async def test_sampling_zero_exports_no_new_trace_but_keeps_the_callers(
    mesh: Mesh, receiver: tuple[Receiver, int], exporter: OtlpExporter
) -> None:
    mesh.waypoint.handler.trace_sampling = 0.0  # what --trace-sampling 0 sets
    r = await mesh.get("/unsampled")
    assert r.json()["headers"]["traceparent"].endswith("-00")  # the backend is told, too
    await mesh.get("/sampled", headers=[("traceparent", f"00-{TRACE}-{PARENT}-01")])
    await wait_spans(receiver[0], 1)
    await asyncio.sleep(0.2)
    assert [attrs(s)["url.path"] for _, s in receiver[0].spans()] == ["/sampled"]


async def test_error_status_marks_the_span(
    mesh: Mesh, receiver: tuple[Receiver, int], exporter: OtlpExporter
) -> None:
    assert (await mesh.get("/status/503")).status == 503
    [(_, span)] = await wait_spans(receiver[0], 1)
    assert span.status.code == 2 and attrs(span)["error.type"] == "503"


async def test_without_a_collector_the_access_log_carries_the_span(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    r = await mesh.get("/logged", headers=[("traceparent", f"00-{TRACE}-{PARENT}-01")])
    _, _, span_id, _ = r.json()["headers"]["traceparent"].split("-")
    await settled(mesh)
    lines = [json.loads(x.message) for x in caplog.records if x.name == "mesh.access"]
    [line] = [d for d in lines if d["reporter"] == "waypoint"]
    assert (line["trace_id"], line["span_id"], line["parent_span_id"]) == (TRACE, span_id, PARENT)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dead_collector_costs_spans_not_requests(mesh: Mesh) -> None:
    """Spans for a collector that is not there are dropped and counted; requests are served
    as before."""
    exp = OtlpExporter(
        ("127.0.0.1", _dead_port()),
        resource={"service.name": "w"},
        registry=mesh.waypoint.metrics.registry,
        interval=0.05,
        timeout=0.5,
    )
    exp.start()
    mesh.waypoint.handler.exporter = exp
    try:
        for _ in range(3):
            assert (await mesh.get("/x")).status == 200
        text = ""
        for _ in range(200):
            text = mesh.waypoint.metrics.exposition().decode()
            if sample(text, "ambientmesh_trace_spans_total", outcome="dropped_export_failed") >= 3:
                break
            await asyncio.sleep(0.05)
        assert sample(text, "ambientmesh_trace_spans_total", outcome="dropped_export_failed") == 3
    finally:
        mesh.waypoint.handler.exporter = None
        await asyncio.to_thread(exp.close)


def test_full_queue_drops_and_counts_without_blocking() -> None:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    exp = OtlpExporter(("127.0.0.1", 9), resource={}, registry=reg, max_queue=2)
    span = Span(TRACE, PARENT, None, None, "GET", 2, 1, 2, ())
    for _ in range(5):  # no thread started: nothing drains the queue
        exp.submit(span)
    assert (
        reg.get_sample_value("ambientmesh_trace_spans_total", {"outcome": "dropped_queue_full"})
        == 3
    )


def test_close_sends_what_was_queued(receiver: tuple[Receiver, int]) -> None:
    """A waypoint shutting down does not lose the spans of its last requests: `close` sends
    them before the batch interval (here far away) would have."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    exp = OtlpExporter(("127.0.0.1", receiver[1]), resource={}, registry=reg, interval=60)
    exp.start()
    for i in range(3):
        exp.submit(Span(TRACE, f"{i + 1:016x}", PARENT, None, "GET", 2, 1, 2, (("k", i),)))
    exp.close()
    got = sorted(s.span_id.hex() for _, s in receiver[0].spans())
    assert got == [f"{i + 1:016x}" for i in range(3)]
    assert reg.get_sample_value("ambientmesh_trace_spans_total", {"outcome": "exported"}) == 3
