"""The waypoint in the mesh: identities end to end, streaming bodies, HTTP/2 and gRPC, retries
and timeouts against misbehaving backends, L7 DENY, metrics and access logs.

Every request goes client → ztunnel n1 → HBONE → waypoint → HBONE → ztunnel n2 → pod, with
real TLS, real h2 and real sockets (see waypointkit).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from tests.integration.waypoint.waypointkit import (
    CLIENT_ID,
    ECHO_VIP,
    GRPC_VIP,
    NS,
    PLAIN_VIP,
    WAYPOINT_ID,
    Mesh,
)

Doc = dict[str, Any]


def route(name: str, rules: list[Doc], parent: str = "echo", port: int | None = None) -> Doc:
    ref: Doc = {"group": "", "kind": "Service", "name": parent}
    if port is not None:
        ref["port"] = port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"parentRefs": [ref], "rules": rules},
    }


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def settled(mesh: Mesh) -> str:
    """The waypoint's metrics once every request it started has been accounted: a request is
    recorded after its last byte went out, which can be after the client has read it."""
    for _ in range(100):
        if not mesh.waypoint.handler.in_flight:
            break
        await asyncio.sleep(0.01)
    return mesh.waypoint.metrics.exposition().decode()


# -- identities ---------------------------------------------------------------------------------


async def test_destination_sees_the_caller_and_the_waypoint_sees_its_client(mesh: Mesh) -> None:
    r = await mesh.get("/who")
    assert r.status == 200
    # The destination ztunnel attributes the stream to the original caller, vouched for by the
    # waypoint (whose own certificate is the TLS peer).
    n2 = mesh.n2.metrics.exposition().decode()
    assert sample(n2, "istio_tcp_connections_opened_total", source_principal=CLIENT_ID) == 1
    assert mesh.waypoint.identity == WAYPOINT_ID
    wp = await settled(mesh)
    assert (
        sample(
            wp,
            "istio_requests_total",
            reporter="waypoint",
            source_principal=CLIENT_ID,
            source_workload="client",
            destination_service_name="echo",
            destination_app="echo",
            response_code="200",
            connection_security_policy="mutual_tls",
        )
        == 1
    )


async def test_destination_l4_policy_applies_to_the_original_caller(mesh: Mesh) -> None:
    deny: Doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-client", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "echo"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [CLIENT_ID[len("spiffe://") :]]}}]}],
        },
    }
    mesh.apply([deny])
    r = await mesh.get("/denied-at-l4")
    assert r.status == 503 and b"401" in r.body  # the CONNECT to the pod was refused
    assert mesh.stats["echo-v1"].requests + mesh.stats["echo-v2"].requests == 0


async def test_service_opted_out_keeps_the_l4_path(mesh: Mesh) -> None:
    r = await mesh.get("/l4", vip=PLAIN_VIP)
    assert r.status == 200
    assert mesh.waypoint.inbound.streams == 0


async def test_connect_for_a_service_not_ours_is_refused(mesh: Mesh) -> None:
    from mesh.hbone import HboneError

    with pytest.raises(HboneError) as err:
        await mesh.n1.pool.connect(
            CLIENT_ID,
            ("127.0.0.9", mesh.waypoint.port),
            f"{PLAIN_VIP}:80",
            expected_peers=frozenset({WAYPOINT_ID}),
        )
    assert err.value.status == 400 and "not served by waypoint" in str(err.value)


# -- HTTP/1.1 streaming ------------------------------------------------------------------------


async def test_keep_alive_requests_share_one_downstream_stream(mesh: Mesh) -> None:
    c = await mesh.client()
    try:
        for i in range(20):
            r = await c.request(f"/ka/{i}")
            assert r.status == 200 and r.json()["path"] == f"/ka/{i}"
    finally:
        c.close()
    assert mesh.waypoint.inbound.streams == 1
    # and the upstream connections were reused, not dialled per request
    backends = mesh.stats["echo-v1"].connections + mesh.stats["echo-v2"].connections
    assert backends <= 2


async def test_large_chunked_body_streams_both_ways(mesh: Mesh) -> None:
    """8 MiB in chunked encoding, echoed back chunk by chunk as it arrives: neither side is
    buffered whole (the backend starts answering before the request has ended)."""
    port = await mesh.port_for(ECHO_VIP, 80)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"POST /echo-body HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\n\r\n")
    payload = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(8):
        w.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        digest.update(payload)
        await w.drain()
    # The response head arrived while we were still sending: streaming, not store-and-forward.
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    w.write(b"0\r\n\r\n")
    got = hashlib.sha256()
    n = 0
    trailer = b""
    while True:
        size_line = await asyncio.wait_for(r.readuntil(b"\r\n"), 10)
        size = int(size_line.strip(), 16)
        if size == 0:
            trailer = await r.readuntil(b"\r\n\r\n")
            break
        chunk = await r.readexactly(size)
        await r.readexactly(2)
        got.update(chunk)
        n += size
    w.close()
    assert n == 8 << 20 and got.digest() == digest.digest()
    assert trailer.lower().startswith(b"x-body-len: 8388608")  # trailers pass through


async def test_content_length_body_and_response(mesh: Mesh) -> None:
    c = await mesh.client()
    try:
        body = b"x" * 300_000
        r = await c.request("/upload", method="POST", body=body)
        assert r.status == 200 and r.json()["body_bytes"] == len(body)
        assert r.json()["headers"]["content-length"] == str(len(body))
    finally:
        c.close()


# -- HTTP/2 ------------------------------------------------------------------------------------


async def h2_request(
    port: int, path: str, *, method: str = "GET", body: bytes = b"", authority: str = "echo"
) -> tuple[int, dict[str, str], bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)],
        end_stream=not body,
    )
    for i in range(0, len(body), 16384):  # within the default frame size and window
        conn.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
    w.write(conn.data_to_send())
    headers: dict[str, str] = {}
    data = bytearray()
    done = False
    while not done:
        chunk = await asyncio.wait_for(r.read(65536), 10)
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = {str(k): str(v) for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
        w.write(conn.data_to_send())
    w.close()
    return int(headers.get(":status", "0")), headers, bytes(data)


async def test_h2_client_to_http1_backend(mesh: Mesh) -> None:
    port = await mesh.port_for(ECHO_VIP, 80)
    status, headers, body = await h2_request(port, "/over-h2?x=1", method="POST", body=b"a" * 60000)
    assert status == 200 and headers["x-pod"] in ("echo-v1", "echo-v2")
    info = json.loads(body)
    assert info["path"] == "/over-h2?x=1" and info["headers"]["host"] == "echo"
    assert info["body_bytes"] == 60000


async def grpc_channel(mesh: Mesh) -> Any:
    import grpc  # type: ignore[import-untyped]

    return grpc.aio.insecure_channel(f"127.0.0.1:{await mesh.port_for(GRPC_VIP, 50051)}")


async def test_grpc_unary_with_trailers(mesh: Mesh) -> None:
    async with await grpc_channel(mesh) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"hi", metadata=(("x-md", "1"),), timeout=10)
        assert await call == b"echo:hi"
        assert ("x-trailer", "unary") in tuple(await call.trailing_metadata())
    wp = await settled(mesh)
    assert sample(wp, "istio_requests_total", request_protocol="grpc", response_code="200") == 1


async def test_grpc_error_status_and_trailers_pass_through(mesh: Mesh) -> None:
    import grpc

    async with await grpc_channel(mesh) as ch:
        call = ch.unary_unary("/test.Echo/Fail")(b"", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "you asked for it"
    assert ("x-why", "asked-to-fail") in tuple(err.value.trailing_metadata())


async def test_grpc_server_streaming(mesh: Mesh) -> None:
    async with await grpc_channel(mesh) as ch:
        call = ch.unary_stream("/test.Echo/ServerStream")(b"50", timeout=10)
        items = [m async for m in call]
    assert items == [b"item-%d" % i for i in range(50)]


async def test_grpc_bidi_streaming_interleaves(mesh: Mesh) -> None:
    """Each answer arrives before the next request is sent: the waypoint forwards both
    directions of one stream at once."""
    async with await grpc_channel(mesh) as ch:
        call = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
        for word in (b"one", b"two", b"three"):
            await call.write(word)
            assert await asyncio.wait_for(call.read(), 5) == word.upper()
        await call.done_writing()
        import grpc

        assert await call.code() == grpc.StatusCode.OK


async def test_grpc_many_concurrent_calls_share_connections(mesh: Mesh) -> None:
    async with await grpc_channel(mesh) as ch:
        unary = ch.unary_unary("/test.Echo/Unary")
        got = await asyncio.gather(*(unary(b"%d" % i, timeout=10) for i in range(100)))
    assert got == [b"echo:%d" % i for i in range(100)]
    assert mesh.waypoint.inbound.streams == 1  # one h2 connection from the client


# -- retries and timeouts ----------------------------------------------------------------------


def retry_route(attempts: int, codes: list[int], **timeouts: str) -> Doc:
    rule: Doc = {
        "backendRefs": [{"name": "echo", "port": 80}],
        "retry": {"attempts": attempts, "codes": codes, "backoff": "5ms"},
    }
    if timeouts:
        rule["timeouts"] = timeouts
    return route("retries", [rule])


async def test_retry_on_503_until_success(mesh: Mesh) -> None:
    mesh.apply([retry_route(2, [503])])
    r = await mesh.get("/flaky/2/a")
    assert r.status == 200
    assert mesh.stats["echo-v1"].counters["/flaky/2/a"] == 3  # two failures, then success


async def test_retries_exhausted_return_the_last_answer(mesh: Mesh) -> None:
    mesh.apply([retry_route(1, [503])])
    r = await mesh.get("/flaky/5/b")
    assert r.status == 503 and r.json()["path"] == "/flaky/5/b"
    assert mesh.stats["echo-v1"].counters["/flaky/5/b"] == 2


async def test_no_retry_for_codes_not_listed(mesh: Mesh) -> None:
    mesh.apply([retry_route(3, [502])])
    r = await mesh.get("/flaky/1/c")
    assert r.status == 503
    assert mesh.stats["echo-v1"].counters["/flaky/1/c"] == 1


async def test_reset_before_response_is_retried(mesh: Mesh) -> None:
    mesh.apply([retry_route(2, [503])])
    r = await mesh.get("/reset-once/d")
    assert r.status == 200
    assert sum(s.dropped for s in mesh.stats.values()) == 1


async def test_reset_without_retry_is_503(mesh: Mesh) -> None:
    r = await mesh.get("/reset")
    assert r.status == 503 and b"reset" in r.body


async def test_backend_request_timeout_is_504(mesh: Mesh) -> None:
    mesh.apply([retry_route(0, [], backendRequest="200ms")])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await mesh.get("/delay/3000")
    assert r.status == 504 and b"timeout" in r.body
    assert loop.time() - t0 < 2.0
    assert (await mesh.get("/delay/10")).status == 200


async def test_request_timeout_covers_retries(mesh: Mesh) -> None:
    mesh.apply([retry_route(5, [504], request="500ms", backendRequest="200ms")])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await mesh.get("/delay/3000")
    assert r.status == 504
    assert 0.4 < loop.time() - t0 < 2.0


async def test_timeouts_cover_the_whole_response_not_just_its_head(mesh: Mesh) -> None:
    """Gateway API: the request timeout runs until the full response is in. A backend that
    sends its head and half the body, then stalls, is cut off at the deadline (the head is
    out already, so the client sees the response break off); without a timeout the same
    response completes."""
    loop = asyncio.get_running_loop()
    r = await mesh.get("/stall-body/300")  # no timeout configured: it completes
    assert r.status == 200 and r.json()["path"] == "/stall-body/300"
    mesh.apply([retry_route(0, [], request="400ms")])
    t0 = loop.time()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ValueError)):
        await mesh.get("/stall-body/3000")
    assert loop.time() - t0 < 2.0


async def test_stale_pooled_connection_is_retried_transparently(mesh: Mesh) -> None:
    """The backend closes a kept-alive connection as the next request arrives on it (the race
    an idle timeout creates). No route retry is configured: the client must still see 200."""
    mesh.apply([route("pin", [{"backendRefs": [{"name": "echo-v1", "port": 80}]}])])
    c = await mesh.client()
    try:
        assert (await c.request("/drop-second")).status == 200
        r = await c.request("/drop-second")
        assert r.status == 200, r.body
    finally:
        c.close()
    assert mesh.stats["echo-v1"].dropped == 1 and mesh.stats["echo-v1"].connections == 2


async def test_connection_closed_while_idle_is_not_reused(mesh: Mesh) -> None:
    mesh.apply([route("pin", [{"backendRefs": [{"name": "echo-v1", "port": 80}]}])])
    c = await mesh.client()
    try:
        assert (await c.request("/then-close")).status == 200
        assert mesh.waypoint.upstreams.idle_h1() == 1
        for _ in range(100):  # the backend closes it 50 ms after answering
            if mesh.waypoint.upstreams.idle_h1() == 0:
                break
            await asyncio.sleep(0.01)
        assert mesh.waypoint.upstreams.idle_h1() == 0
        assert (await c.request("/two")).status == 200
        assert mesh.stats["echo-v1"].connections == 2 and mesh.stats["echo-v1"].dropped == 0
    finally:
        c.close()


# -- L7 policy ---------------------------------------------------------------------------------


async def test_l7_deny_is_403_with_a_body_that_says_so(mesh: Mesh) -> None:
    mesh.apply(
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "no-admin", "namespace": NS},
                "spec": {
                    "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin*"], "methods": ["GET"]}}]}],
                },
            }
        ]
    )
    r = await mesh.get("/admin/users")
    assert r.status == 403 and b"RBAC: access denied" in r.body and b"mesh/no-admin" in r.body
    assert (await mesh.get("/public")).status == 200
    r = await mesh.get("/admin/users", method="POST", body=b"")
    assert r.status == 200  # the rule names GET only
    wp = await settled(mesh)
    assert sample(wp, "istio_requests_total", response_code="403", response_flags="DENY") == 1


async def test_l7_allow_by_principal(mesh: Mesh) -> None:
    mesh.apply(
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "only-others", "namespace": NS},
                "spec": {
                    "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                    "name": "waypoint"}],
                    "action": "ALLOW",
                    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}],
                },
            }
        ]
    )  # fmt: skip
    r = await mesh.get("/anything")
    assert r.status == 403 and b"no ALLOW policy matched" in r.body


# -- telemetry ---------------------------------------------------------------------------------


async def test_metrics_and_one_access_log_line_per_request(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.access")
    c = await mesh.client()
    try:
        for _ in range(3):
            assert (await c.request("/m", method="POST", body=b"12345")).status == 200
        assert (await c.request("/status/404")).status == 404
    finally:
        c.close()
    lines = [json.loads(r.message) for r in caplog.records if r.name == "mesh.access"]
    wp_lines = [d for d in lines if d["reporter"] == "waypoint"]
    assert len(wp_lines) == 4
    assert [d["status"] for d in wp_lines] == [200, 200, 200, 404]
    assert wp_lines[0]["method"] == "POST" and wp_lines[0]["path"] == "/m"
    assert wp_lines[0]["src.identity"] == CLIENT_ID and wp_lines[0]["bytes_sent"] == 5
    wp = await settled(mesh)
    assert sample(wp, "istio_requests_total", response_code="200") == 3
    assert sample(wp, "istio_requests_total", response_code="404") == 1
    assert sample(wp, "istio_request_duration_milliseconds_count", response_code="200") == 3
    assert sample(wp, "istio_request_bytes_sum", response_code="200") == 15
    assert sample(wp, "istio_response_bytes_count", response_code="404") == 1
    assert sample(wp, "istio_response_bytes_sum", response_code="200") > 0


async def test_bad_request_is_400_and_the_waypoint_keeps_serving(mesh: Mesh) -> None:
    port = await mesh.port_for(ECHO_VIP, 80)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /x HTTP/1.1\r\nhost: echo\r\ncontent-length: nope\r\n\r\n")
    data = await asyncio.wait_for(r.read(-1), 10)
    w.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert (await mesh.get("/after")).status == 200


async def test_client_can_use_another_client_connection_meanwhile(mesh: Mesh) -> None:
    a, b = await mesh.client(), await mesh.client()
    try:
        slow = asyncio.create_task(a.request("/delay/300"))
        fast = await b.request("/fast")
        assert fast.status == 200 and not slow.done()
        assert (await slow).status == 200
    finally:
        a.close()
        b.close()


async def test_request_mirror_copies_to_another_backend(mesh: Mesh) -> None:
    mirror = {"type": "RequestMirror",
              "requestMirror": {"backendRef": {"name": "echo-v2", "port": 80}}}  # fmt: skip
    mesh.apply(
        [route("mirror", [{"filters": [mirror], "backendRefs": [{"name": "echo-v1", "port": 80}]}])]
    )
    r = await mesh.get("/mirrored", method="POST", body=b"copy me")
    assert r.status == 200 and r.json()["pod"] == "echo-v1"
    for _ in range(100):
        if mesh.stats["echo-v2"].requests:
            break
        await asyncio.sleep(0.01)
    assert mesh.stats["echo-v2"].requests == 1 and mesh.stats["echo-v1"].requests == 1


async def test_idle_upstream_connections_expire(mesh: Mesh) -> None:
    mesh.waypoint.upstreams.idle_timeout = 0.1
    mesh.apply([route("pin", [{"backendRefs": [{"name": "echo-v1", "port": 80}]}])])
    assert (await mesh.get("/once")).status == 200
    assert mesh.waypoint.upstreams.idle_h1() == 1
    for _ in range(100):
        if mesh.waypoint.upstreams.idle_h1() == 0:
            break
        await asyncio.sleep(0.01)
    assert mesh.waypoint.upstreams.idle_h1() == 0
    assert (await mesh.get("/again")).status == 200
    assert mesh.stats["echo-v1"].connections == 2


async def test_grpc_large_messages_cross_http2_flow_control(mesh: Mesh) -> None:
    """6 MiB each way: several times every HTTP/2 window on the path (client, waypoint both
    sides, HBONE), so it only completes if window credit is returned as data is consumed."""
    import grpc

    big = bytes(range(256)) * (6 * 4096)
    opts = [
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.max_send_message_length", 16 << 20),
    ]
    port = await mesh.port_for(GRPC_VIP, 50051)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        got = await ch.unary_unary("/test.Echo/Unary")(big, timeout=30)
    assert got == b"echo:" + big


# -- request identity ---------------------------------------------------------------------------


async def test_forwarded_requests_carry_request_id_and_forwarded_headers(mesh: Mesh) -> None:
    import uuid

    r = await mesh.get("/id")
    assert r.status == 200
    seen = json.loads(r.body)["headers"]
    assert uuid.UUID(seen["x-request-id"]).version == 4
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client pod, as HBONE vouched for it
    assert seen["x-forwarded-proto"] == "http"

    r = await mesh.get(
        "/id",
        headers=[
            ("x-request-id", "from-the-caller"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-proto", "https"),
        ],
    )
    seen = json.loads(r.body)["headers"]
    assert seen["x-request-id"] == "from-the-caller"
    assert seen["x-forwarded-for"] == "192.0.2.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
