"""The observability server over a real loopback socket, including hostile requests."""

from __future__ import annotations

import asyncio
import json
import logging

from mesh.config.model import Namespace
from mesh.config.snapshot import Snapshot
from mesh.metrics import ConnectionLabels, MeshMetrics
from mesh.observability import ObservabilityServer, admin_routes


async def fetch(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_metrics_ready_admin() -> None:
    metrics = MeshMetrics()
    metrics.tcp_opened(ConnectionLabels(destination_service="web.shop.svc.cluster.local"))
    ready = {"ok": False}
    snap = Snapshot(namespaces=(Namespace("shop"),), version=4)
    async with ObservabilityServer(
        metrics=metrics,
        ready=lambda: ready["ok"],
        routes=admin_routes(lambda: snap, lambda: {"certificates": [{"id": "x"}]}),
    ) as srv:
        status, body = await fetch(srv.port, get("/metrics"))
        assert status == 200
        assert b"istio_tcp_connections_opened_total{" in body
        assert b'destination_service="web.shop.svc.cluster.local"' in body
        assert (await fetch(srv.port, get("/healthz/ready")))[0] == 503
        ready["ok"] = True
        assert (await fetch(srv.port, get("/healthz/ready")))[0] == 200
        status, body = await fetch(srv.port, get("/config_dump"))
        assert status == 200 and json.loads(body)["version"] == 4
        assert json.loads(body)["certificates"] == [{"id": "x"}]
        try:
            status, body = await fetch(srv.port, get("/logging?mesh.config=debug"))
            assert status == 200 and json.loads(body)["changed"] == {"mesh.config": "DEBUG"}
            assert logging.getLogger("mesh.config").level == logging.DEBUG
            assert (await fetch(srv.port, get("/logging?level=loud")))[0] == 400
        finally:
            logging.getLogger("mesh.config").setLevel(logging.NOTSET)
        assert (await fetch(srv.port, get("/nope")))[0] == 404


async def test_bad_requests_never_crash() -> None:
    async with ObservabilityServer(ready=lambda: True) as srv:
        assert (await fetch(srv.port, b"\xff\xfe garbage\r\n\r\n"))[0] == 400
        assert (await fetch(srv.port, b"POST /healthz/ready HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await fetch(srv.port, b"GET /x SPDY/3\r\n\r\n"))[0] == 400
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
        assert (await fetch(srv.port, huge))[0] == 431
        # A client that disconnects mid-request.
        _, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /hea")
        w.close()
        await asyncio.sleep(0.05)
        # Still serving.
        assert (await fetch(srv.port, get("/healthz/ready")))[0] == 200


async def test_handler_exception_is_500() -> None:
    def boom(_: object) -> tuple[int, object]:
        raise RuntimeError("bug")

    async with ObservabilityServer(routes={"/boom": boom}) as srv:
        assert (await fetch(srv.port, get("/boom")))[0] == 500
        assert (await fetch(srv.port, get("/boom")))[0] == 500
