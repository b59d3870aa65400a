"""Request bodies past the waypoint's 1 MiB retry/mirror buffer, through a real waypoint.

The primary request always streams through whole; what the buffer limits is sending the body
*again*. A retry is not attempted once more than the buffer went out (the answer the backend
gave is final) and a mirror is skipped, each with the reason in the access-log line
(`retry_skipped` / `mirror_skipped`), never a silent truncation. Over HTTP/1.1 (content-length)
and HTTP/2 (flow-controlled DATA frames), checking the backend's byte count.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from tests.integration.waypoint.test_waypoint_mesh import route, settled
from tests.integration.waypoint.waypointkit import ECHO_VIP, Mesh

BUFFER = 1 << 20
BIG = BUFFER + 1


async def h2_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/2 POST that respects the waypoint's flow control (a body this size is more
    than the initial window)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid, [(":method", "POST"), (":scheme", "http"), (":authority", "echo"), (":path", path)]
    )
    w.write(conn.data_to_send())
    sent, status, data, done = 0, 0, bytearray(), False

    def handle(events: list[Any]) -> None:
        nonlocal status, done
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                data.extend(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True

    try:
        while not done:
            while sent < len(body) and not done:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                n = min(n, len(body) - sent)
                if n <= 0:
                    break
                conn.send_data(sid, body[sent : sent + n], end_stream=sent + n == len(body))
                sent += n
            w.write(conn.data_to_send())
            await w.drain()
            if done:
                break
            chunk = await asyncio.wait_for(r.read(65536), 20)
            if not chunk:
                break
            handle(conn.receive_data(chunk))
            w.write(conn.data_to_send())
    finally:
        w.close()
    return status, bytes(data)


async def send(mesh: Mesh, proto: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    if proto == "h2":
        status, raw = await h2_post(await mesh.port_for(ECHO_VIP, 80), path, body)
    else:
        r = await mesh.get(path, method="POST", body=body, deadline=30)
        status, raw = r.status, r.body
    return status, json.loads(raw)


def waypoint_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [json.loads(r.message) for r in caplog.records if r.name == "mesh.access"]
    return [d for d in lines if d["reporter"] == "waypoint"]


def pinned(rule: dict[str, Any]) -> dict[str, Any]:
    return route("big", [{"backendRefs": [{"name": "echo-v1", "port": 80}], **rule}])


PROTOS = pytest.mark.parametrize("proto", ["http/1.1", "h2"])


@PROTOS
async def test_body_past_the_buffer_streams_through_whole(mesh: Mesh, proto: str) -> None:
    mesh.apply([pinned({})])
    body = bytes(range(256)) * (BIG // 256) + b"!"
    assert len(body) == BIG
    status, info = await send(mesh, proto, "/whole", body)
    assert status == 200 and info["body_bytes"] == BIG


@PROTOS
async def test_retry_is_skipped_past_the_buffer_and_says_so(
    mesh: Mesh, proto: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    mesh.apply([pinned({"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}})])
    status, info = await send(mesh, proto, "/status/503", bytes(BIG))
    assert status == 503 and info["body_bytes"] == BIG  # the backend's own answer, all bytes
    assert mesh.stats["echo-v1"].paths.count("/status/503") == 1  # not sent again
    await settled(mesh)
    [line] = waypoint_lines(caplog)
    assert line["retry_skipped"] == "body exceeds 1 MiB retry buffer"
    assert line["status"] == 503 and line["bytes_sent"] == BIG


async def test_retry_within_the_buffer_happens(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """The same request one byte smaller: retried with the whole body each time (so the
    buffer, not the route, is what stopped the retry above)."""
    caplog.set_level(logging.INFO, logger="mesh.access")
    mesh.apply([pinned({"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}})])
    status, info = await send(mesh, "http/1.1", "/status/503", bytes(BUFFER))
    assert status == 503 and info["body_bytes"] == BUFFER
    assert mesh.stats["echo-v1"].paths.count("/status/503") == 3
    await settled(mesh)
    [line] = waypoint_lines(caplog)
    assert "retry_skipped" not in line


@PROTOS
async def test_mirror_is_skipped_past_the_buffer_and_says_so(
    mesh: Mesh, proto: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    mirror = {"type": "RequestMirror",
              "requestMirror": {"backendRef": {"name": "echo-v2", "port": 80}}}  # fmt: skip
    mesh.apply([pinned({"filters": [mirror]})])
    status, info = await send(mesh, proto, "/mirror-big", bytes(BIG))
    assert status == 200 and info["body_bytes"] == BIG and info["pod"] == "echo-v1"
    await settled(mesh)
    [line] = waypoint_lines(caplog)
    assert line["mirror_skipped"] == "body exceeds 1 MiB mirror buffer"
    # a small body on the same route is mirrored: the size is what skipped the big one
    status, info = await send(mesh, proto, "/mirror-small", b"small")
    for _ in range(200):
        if mesh.stats["echo-v2"].requests:
            break
        await asyncio.sleep(0.01)
    assert mesh.stats["echo-v2"].paths == ["/mirror-small"]
