"""The observe UI's HTTP server on real loopback sockets: what it answers, to whom, and how it
holds up against bad requests, stalled pages and failing flow sources."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from meshctl.observe import ui as ui_module
from meshctl.observe.ui import PAGE_CSP, follow_flows, serve_ui
from tests.fakes.recorded_flows import HOSTILE_POD, demo_flows
from tests.integration.meshctl.test_observe_ui import Recording, ui

pytestmark = pytest.mark.timeout(120)


async def request(
    port: int, raw: bytes, *, read_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), read_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def get(path: str, port: int, host: str | None = None) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n\r\n".encode()


async def test_page_assets_map_and_flows() -> None:
    flows_in = demo_flows()
    async with ui(Recording(flows_in, len(flows_in))) as port:
        status, headers, body = await request(port, get("/", port))
        assert status == 200 and b'<script src="/static/app.js"' in body
        assert headers["content-security-policy"] == PAGE_CSP
        assert headers["x-content-type-options"] == "nosniff"
        for path in ("/static/app.js", "/static/app.css"):
            status, _, body = await request(port, get(path, port))
            assert status == 200 and body

        deadline = time.monotonic() + 30
        while True:
            status, headers, flows = await request(port, get("/flows.json", port))
            if len(json.loads(flows)) == len(flows_in) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert json.loads(flows) == flows_in
        assert any(f["source"]["pod"] == HOSTILE_POD for f in json.loads(flows))

        while True:
            status, headers, svg = await request(port, get("/map.svg", port))
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and headers["content-type"] == "image/svg+xml"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert b"server.shop" in svg and b"<img" not in svg


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
        (b"GET /../../etc/passwd HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: evil.example:80\r\n\r\n", 403),  # DNS rebinding
        (b"GET / HTTP/1.1\r\n\r\n", 403),  # no Host at all
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: {host}\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_get_clear_answers(raw: bytes, status: int) -> None:
    async with ui(Recording([], 0)) as port:
        raw = raw.replace(b"{host}", f"127.0.0.1:{port}".encode())
        got, _, body = await request(port, raw)
        assert got == status, body
        # ... and the server goes on serving.
        assert (await request(port, get("/", port)))[0] == 200


async def test_localhost_names_are_accepted() -> None:
    async with ui(Recording([], 0)) as port:
        for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}"):
            assert (await request(port, get("/", port, host)))[0] == 200


async def test_a_stalled_page_never_holds_up_the_flow_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ui_module, "STREAM_QUEUE", 64)
    many = [dict(f, reason="x" * 2000) for f in demo_flows()] * 200  # ~10 MB of events
    async with ui(Recording(many, len(many))) as port:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/events", port))  # and never read
        await writer.drain()
        try:
            deadline = time.monotonic() + 60
            count = 0
            while time.monotonic() < deadline:
                _, _, body = await request(port, get("/flows.json", port))
                count = len(json.loads(body))
                if count == 2000:  # the store's bound: every flow was taken in
                    break
                await asyncio.sleep(0.2)
            assert count == 2000
        finally:
            writer.close()


async def test_a_failing_source_is_reported_and_the_page_stays_up() -> None:
    async def broken() -> AsyncIterator[Mapping[str, Any]]:
        yield demo_flows()[0]
        yield "not a flow"  # type: ignore[misc]
        raise RuntimeError("node2 unreachable")

    async with ui(broken) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(get("/events", port))
            await writer.drain()
            seen = b""
            deadline = time.monotonic() + 30
            while b"failed: node2 unreachable" not in seen and time.monotonic() < deadline:
                seen += await asyncio.wait_for(reader.read(65536), 30)
            assert b'event: source\ndata: "failed: node2 unreachable"' in seen
        finally:
            writer.close()
        _, _, body = await request(port, get("/flows.json", port))
        assert len(json.loads(body)) == 1


async def test_without_graphviz_the_page_says_why_there_is_no_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    async with ui(Recording(demo_flows(), 3)) as port:
        deadline = time.monotonic() + 30
        while True:
            status, _, body = await request(port, get("/map.svg", port))
            if b"graphviz" in body or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and b"apt-get install graphviz" in body


async def test_stopping_the_ui_closes_open_pages_promptly() -> None:
    ports: list[int] = []
    ready = asyncio.Event()
    source: Callable[[], AsyncIterator[Mapping[str, Any]]] = Recording(demo_flows(), 5)
    task = asyncio.create_task(
        serve_ui(source, "127.0.0.1", 0, ready=ready, on_listening=lambda _h, p: ports.append(p))
    )
    await asyncio.wait_for(ready.wait(), 30)
    reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
    writer.write(get("/events", ports[0]))
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"event: flows"), 30)
    task.cancel()
    started = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert time.monotonic() - started < 20
    assert await asyncio.wait_for(reader.read(), 10) is not None  # EOF: the stream was ended
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", ports[0])


async def test_flow_objects_with_to_dict_are_served_as_records() -> None:
    class FlowObject:
        def __init__(self, record: dict[str, Any]) -> None:
            self.record = record

        def to_dict(self) -> dict[str, Any]:
            return self.record

    flows_in = demo_flows()

    async def source() -> AsyncIterator[Any]:
        for f in flows_in:
            yield FlowObject(f)
        await asyncio.Event().wait()

    async with ui(source) as port:
        deadline = time.monotonic() + 30
        while True:
            _, _, body = await request(port, get("/flows.json", port))
            if len(json.loads(body)) == len(flows_in) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert json.loads(body) == flows_in


async def test_follow_flows_turns_a_callback_follower_into_a_flow_source() -> None:
    async def run(emit: Callable[[Any], None]) -> None:
        for i in range(3):
            emit({"n": i})
            await asyncio.sleep(0)
        for i in range(3, 6):  # a burst, emitted before the reader takes any
            emit({"n": i})

    got = [f async for f in follow_flows([{"n": -1}], run)]
    assert got == [{"n": n} for n in range(-1, 6)]


async def test_follow_flows_bounds_what_waits_and_passes_errors_on() -> None:
    async def burst(emit: Callable[[Any], None]) -> None:
        for i in range(100):
            emit({"n": i})

    assert len([f async for f in follow_flows([], burst, max_pending=10)]) == 10

    async def broken(emit: Callable[[Any], None]) -> None:
        emit({"n": 0})
        raise RuntimeError("stream lost")

    got: list[Any] = []
    with pytest.raises(RuntimeError, match="stream lost"):
        async for f in follow_flows([], broken):
            got.append(f)
    assert got == [{"n": 0}]


async def test_closing_follow_flows_cancels_the_follower() -> None:
    cancelled = asyncio.Event()

    async def forever(emit: Callable[[Any], None]) -> None:
        emit({"n": 0})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    flows = follow_flows([], forever)
    assert await anext(flows) == {"n": 0}
    await flows.aclose()
    await asyncio.wait_for(cancelled.wait(), 10)
