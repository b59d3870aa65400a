"""The waypoint's upstream HTTP/1.1 pool under an HTTP/2 client with many streams in flight.

One downstream HTTP/2 connection can have up to `max_concurrent_streams` requests in flight,
each holding an upstream HTTP/1.1 connection. The pool must keep them all when they come back:
closing some (the idle cap was 64) meant a new CONNECT, a dial at the destination and an
accept at the app for every request past the cap, on every burst: CPU spent exactly when the
waypoint was busiest, which turned a small overload into a collapse.
"""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

from tests.integration.waypoint.test_waypoint_mesh import route
from tests.integration.waypoint.waypointkit import ECHO_VIP, Mesh

BURST = 90  # more than the old cap, within the stream limit (100)


async def _burst(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection, path: str) -> list[int]:  # fmt: skip
    """BURST concurrent GETs on one HTTP/2 connection; their statuses."""
    sids = []
    for _ in range(BURST):
        sid = conn.get_next_available_stream_id()
        sids.append(sid)
        hs = [(":method", "GET"), (":scheme", "http"), (":authority", "echo"), (":path", path)]
        conn.send_headers(sid, hs, end_stream=True)
    w.write(conn.data_to_send())
    status: dict[int, int] = {}
    ended: set[int] = set()
    while len(ended) < BURST:
        chunk = await asyncio.wait_for(r.read(65536), 20)
        assert chunk, "the waypoint closed the connection"
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = int({str(k): str(v) for k, v in ev.headers}[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
        w.write(conn.data_to_send())
    return [status.get(s, 0) for s in sids]


async def test_a_burst_of_h2_streams_reuses_every_upstream_connection(mesh: Mesh) -> None:
    mesh.apply([route("pin", [{"backendRefs": [{"name": "echo-v1", "port": 80}]}])])
    r, w = await asyncio.open_connection("127.0.0.1", await mesh.port_for(ECHO_VIP, 80))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    conn.initiate_connection()
    try:
        # the backend holds each answer, so all of them are in flight at once
        assert await _burst(r, w, conn, "/delay/400") == [200] * BURST
        up = mesh.waypoint.upstreams
        dials, conns = up.dials, mesh.stats["echo-v1"].connections
        assert dials >= BURST // 2  # (the burst did run concurrently)
        for _ in range(100):  # the last exchanges park their connections after the answer
            if up.idle_h1() == dials:
                break
            await asyncio.sleep(0.01)
        assert up.idle_h1() == dials
        assert await _burst(r, w, conn, "/delay/400") == [200] * BURST
        assert up.dials == dials and mesh.stats["echo-v1"].connections == conns
    finally:
        w.close()
