"""Attacks on a real waypoint process, each asserting the refusal, that a good request
(HTTP/1.1 and HTTP/2) succeeds right after, and that the process's fds and RSS are back to
their baseline (read from /proc). See wpkit for the setup and the limits it runs with."""

from __future__ import annotations

import asyncio
import json
import os

import h2.errors
import h2.events
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.adversarial.waypoint.wpkit import LIMITS, H2Client, Waypoint

pytestmark = pytest.mark.asyncio(loop_scope="module")

POST = b"POST /x HTTP/1.1\r\nhost: web\r\n"

SMUGGLING = {
    "cl-and-te": POST + b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": POST + b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n",
    "two-cl": POST + b"content-length: 2\r\ncontent-length: 2\r\n\r\nab",
    "conflicting-cl": POST + b"content-length: 2\r\ncontent-length: 3\r\n\r\nabc",
    "cl-list": POST + b"content-length: 2, 2\r\n\r\nab",
    "cl-negative": POST + b"content-length: -1\r\n\r\n",
    "te-gzip-chunked": POST + b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-not-last": POST + b"transfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-identity": POST + b"transfer-encoding: identity\r\n\r\n",
    "te-twice": POST + b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-http10": b"POST /x HTTP/1.0\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": POST + b"transfer-encoding : chunked\r\n\r\n0\r\n\r\n",
    "chunk-size-not-hex": POST + b"transfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "chunk-size-overflow": POST
    + b"transfer-encoding: chunked\r\n\r\n1ffffffffffffffff\r\nab\r\n0\r\n\r\n",
    "chunk-size-negative": POST + b"transfer-encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
    "chunk-missing-crlf": POST + b"transfer-encoding: chunked\r\n\r\n2\r\nabX0\r\n\r\n",
    "chunk-bare-lf": POST + b"transfer-encoding: chunked\r\n\r\n2\nab\n0\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nhost: web\r\nx-a: b\r\n c\r\n\r\n",
    "bare-lf-headers": b"GET / HTTP/1.1\nhost: web\nx-a: b\n\n",
    "bare-cr": b"GET / HTTP/1.1\r\nhost: web\rx-a: b\r\n\r\n",
    "bad-header-name": b"GET / HTTP/1.1\r\nhost: web\r\nx a: b\r\n\r\n",
    "empty-header-name": b"GET / HTTP/1.1\r\nhost: web\r\n: b\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nhost: web\r\nx-a: b\x00c\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nhost: web\r\nhost: evil\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
}


async def _clean(wp: Waypoint, baseline: tuple[int, int]) -> None:
    await wp.good()
    fds, rss = await wp.settle(baseline)
    case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    print(f"\n{case}: fds {baseline[0]} -> {fds}, RSS {baseline[1]} -> {rss} KiB")
    assert fds <= baseline[0], f"fds {baseline[0]} -> {fds}"
    assert rss <= baseline[1] + 16 * 1024, f"RSS {baseline[1]} -> {rss} KiB"


async def test_smuggling_is_refused_with_400_and_never_forwarded(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    before = wp.stats.requests
    failed = {}
    for name, raw in SMUGGLING.items():
        data, closed = await wp.h1(raw)
        if not (data.startswith(b"HTTP/1.1 400 ") and closed and b"connection: close" in data):
            failed[name] = (data[:80], closed)
    assert not failed
    assert wp.stats.requests == before, wp.stats.paths[before:]  # none reached the backend
    await _clean(wp, baseline)


async def test_smuggled_second_request_never_reaches_the_backend(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    """The classic CL.TE payload: a front end that took Content-Length would forward the
    tail as a second request (`GET /smuggled`)."""
    before = len(wp.stats.paths)
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: web\r\n\r\n"
    raw = POST + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body) + body
    data, closed = await wp.h1(raw)
    assert data.startswith(b"HTTP/1.1 400 ") and closed
    await _clean(wp, baseline)
    assert "/smuggled" not in wp.stats.paths[before:]


async def test_bad_chunk_after_the_head_went_upstream_is_400(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    """The head and a good first chunk are already on their way to the backend when a bad
    chunk size arrives: the upstream request is aborted (the backend never sees a complete
    request) and the client gets 400."""
    before = wp.stats.requests
    st = await wp.stream()
    try:
        st.send(POST + b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        await asyncio.sleep(0.5)  # the request is being forwarded
        st.send(b"zz\r\nsmuggled\r\n0\r\n\r\n")
        await asyncio.wait_for(st.inner.eof.wait(), 10)
        assert bytes(st.inner.data).startswith(b"HTTP/1.1 400"), bytes(st.inner.data)[:80]
    finally:
        st.close()
    await _clean(wp, baseline)
    assert wp.stats.requests == before + 2  # only _clean's good requests


@pytest.mark.parametrize(
    ("name", "raw", "status"),
    [
        ("many-headers", b"".join(b"x-%d: v\r\n" % i for i in range(200)), b"431"),
        ("big-header", b"x-big: " + b"a" * 20_000 + b"\r\n", b"431"),
        ("huge-headers", b"".join(b"x-%d: %s\r\n" % (i, b"a" * 900) for i in range(300)), b"431"),
    ],
    ids=["many-headers", "big-header", "huge-headers"],
)
async def test_oversized_head_is_431(
    wp: Waypoint, baseline: tuple[int, int], name: str, raw: bytes, status: bytes
) -> None:
    data, closed = await wp.h1(b"GET / HTTP/1.1\r\nhost: web\r\n" + raw + b"\r\n")
    assert data.startswith(b"HTTP/1.1 " + status) and closed, data[:80]
    await _clean(wp, baseline)


async def test_long_request_target_is_414(wp: Waypoint, baseline: tuple[int, int]) -> None:
    data, closed = await wp.h1(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nhost: web\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 414") and closed, data[:80]
    await _clean(wp, baseline)


async def test_slowloris_head_is_408(wp: Waypoint, baseline: tuple[int, int]) -> None:
    """Headers dribbled a byte at a time never complete: 408 after --headers-timeout (1 s),
    though bytes keep arriving."""
    st = await wp.stream()
    try:
        st.send(b"GET / HTTP/1.1\r\nhost: web\r\n")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not st.inner.eof.is_set() and loop.time() - t0 < 15:
            st.send(b"x")
            await asyncio.sleep(0.2)
        assert st.inner.eof.is_set(), "still open after 15 s"
        assert bytes(st.inner.data).startswith(b"HTTP/1.1 408")
    finally:
        st.close()
    await _clean(wp, baseline)


async def test_later_heads_on_a_connection_get_their_own_headers_timeout(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    """One head timer per connection, re-armed lazily: a keep-alive connection's later head
    has the full --headers-timeout (1 s) from its own first byte, never the connect's or an
    earlier head's deadline, and a later head that dribbles is still 408."""
    st = await wp.stream()
    loop = asyncio.get_running_loop()

    async def responses(n: int) -> None:
        async with asyncio.timeout(10):
            while bytes(st.inner.data).count(b"HTTP/1.1 ") < n:
                st.inner.changed.clear()
                await st.inner.changed.wait()

    try:
        t0 = loop.time()
        st.send(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        await responses(1)
        # The second head starts 0.7 s after the connect and takes 0.6 s: past the connect's
        # deadline (1 s), inside its own.
        await asyncio.sleep(max(0.0, t0 + 0.7 - loop.time()))
        begun = loop.time()
        st.send(b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.6)
        st.send(b"host: web\r\n\r\n")
        took = loop.time() - begun
        await responses(2)
        got = bytes(st.inner.data)
        if took < 0.9:  # (a machine this loaded cannot tell: nothing to assert)
            assert got.count(b"HTTP/1.1 200") == 2 and b" 408 " not in got, got[-300:]
        st.send(b"GET / HTTP/1.1\r\nhost: web\r\n")
        t1 = loop.time()
        while not st.inner.eof.is_set() and loop.time() - t1 < 15:
            st.send(b"x")
            await asyncio.sleep(0.2)
        assert st.inner.eof.is_set(), "still open after 15 s"
        assert b"HTTP/1.1 408" in bytes(st.inner.data)
    finally:
        st.close()
    await _clean(wp, baseline)


async def test_silent_connection_is_closed(wp: Waypoint, baseline: tuple[int, int]) -> None:
    """A stream that never says a byte is a slowloris too."""
    st = await wp.stream()
    try:
        await asyncio.wait_for(st.inner.eof.wait(), 15)
    finally:
        st.close()
    await _clean(wp, baseline)


async def test_backend_smuggling_response_is_502(wp: Waypoint, baseline: tuple[int, int]) -> None:
    data, _ = await wp.h1(b"GET /bad-response HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 502"), data[:80]
    await _clean(wp, baseline)


async def test_h2_streams_past_the_limit_are_refused_connection_kept(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    limit = int(LIMITS["--max-concurrent-streams"])
    c = H2Client(await wp.stream())
    try:
        # Sent at once, before the server's SETTINGS could be read (h2 alone would kill the
        # connection with PROTOCOL_ERROR here).
        sids = [c.request("/slow") for _ in range(limit + 10)]

        def refused(evs: list[h2.events.Event]) -> list[int]:
            return [
                e.stream_id
                for e in evs
                if isinstance(e, h2.events.StreamReset)
                and e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            ]

        await c.wait(lambda evs: len(refused(evs)) >= 10)
        assert sorted(refused(c.events)) == sids[limit:]
        assert c.goaway() is None
        for sid in sids[:limit]:
            c.c.reset_stream(sid)
        c.st.send(c.c.data_to_send())
        await asyncio.sleep(0.3)  # the resets reach the handlers
        assert await c.response(c.request("/")) == 200  # same connection
    finally:
        c.st.close()
    await _wait_backend_idle(wp)
    await _clean(wp, baseline)


async def _wait_backend_idle(wp: Waypoint) -> None:
    for _ in range(100):
        if wp.stats.serving == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{wp.stats.serving} upstream requests still open")


async def test_h2_rapid_reset_cancels_upstream_and_goes_away(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    c = H2Client(await wp.stream())
    try:
        for _ in range(2000):
            sid = c.request("/slow")
            c.c.reset_stream(sid)
        c.st.send(c.c.data_to_send())
        await c.wait(lambda evs: c.goaway() is not None, within=30)
        ga = c.goaway()
        assert ga is not None and ga.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        c.st.close()
    await _wait_backend_idle(wp)  # every reset stream's upstream request was cancelled
    await _clean(wp, baseline)


@pytest.mark.parametrize("frame", ["settings", "ping"])
async def test_h2_control_frame_flood_goes_away(
    wp: Waypoint, baseline: tuple[int, int], frame: str
) -> None:
    c = H2Client(await wp.stream())
    try:
        f = SettingsFrame(0, settings={0x3: 100}) if frame == "settings" else PingFrame(0)
        c.st.send(f.serialize() * 5000)
        await c.wait(lambda evs: c.goaway() is not None, within=30)
        ga = c.goaway()
        assert ga is not None and ga.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        c.st.close()
    await _clean(wp, baseline)


async def test_h2_continuation_flood_is_refused(wp: Waypoint, baseline: tuple[int, int]) -> None:
    c = H2Client(await wp.stream())
    try:
        block = hpack.Encoder().encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/")]
        )
        out = HeadersFrame(1, data=block).serialize()  # no END_HEADERS: more to come
        cont = ContinuationFrame(1, data=b"\x40\x01a\x01b").serialize()  # x: y, forever
        c.st.send(out + cont * 2000)
        await c.wait(lambda evs: c.goaway() is not None, within=30)
        assert c.goaway() is not None
        await asyncio.wait_for(c.st.inner.eof.wait(), 10)
    finally:
        c.st.close()
    await _clean(wp, baseline)


@pytest.mark.parametrize("how", ["stalled", "large"])
async def test_h2_open_header_block_is_bounded(
    wp: Waypoint, baseline: tuple[int, int], how: str
) -> None:
    """A header block that never ends (slowloris in HTTP/2), or that grows past the header
    limit in few, large CONTINUATION frames (h2 counts only frames): GOAWAY."""
    c = H2Client(await wp.stream())
    try:
        # Settle the SETTINGS exchange first: our ACK inside the open block would itself be
        # a protocol error.
        await c.wait(lambda evs: any(isinstance(e, h2.events.SettingsAcknowledged) for e in evs))
        block = hpack.Encoder().encode([(":method", "GET"), (":path", "/")])
        c.st.send(HeadersFrame(1, data=block).serialize())  # no END_HEADERS
        if how == "large":
            big = b"\x40\x05x-big" + b"\x7f\x81\x1f" + b"a" * 4096  # literal, 4096-byte value
            c.st.send(ContinuationFrame(1, data=big).serialize() * 10)
        await c.wait(lambda evs: c.goaway() is not None, within=15)
        ga = c.goaway()
        assert ga is not None and ga.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        c.st.close()
    await _clean(wp, baseline)


async def test_h2_header_list_too_large_is_refused(wp: Waypoint, baseline: tuple[int, int]) -> None:
    c = H2Client(await wp.stream())
    try:
        sid = c.request("/", extra=[("x-big", "a" * 20_000)])
        status = await c.response(sid)
        ga = c.goaway()
        assert status in (0, 431) and (status == 431 or ga is not None), (status, ga)
    finally:
        c.st.close()
    await _clean(wp, baseline)


async def test_h2_too_many_headers_is_431_connection_kept(
    wp: Waypoint, baseline: tuple[int, int]
) -> None:
    c = H2Client(await wp.stream())
    try:
        sid = c.request("/", extra=[(f"x-{i}", "v") for i in range(200)])
        assert await c.response(sid) == 431
        assert await c.response(c.request("/")) == 200
    finally:
        c.st.close()
    await _clean(wp, baseline)


async def test_connections_past_the_limit_get_503(wp: Waypoint, baseline: tuple[int, int]) -> None:
    from mesh.hbone import HboneError

    limit = int(LIMITS["--max-connections"])
    held = []
    try:
        for _ in range(limit):
            st = await wp.stream()
            st.send(b"GET /slow HTTP/1.1\r\nhost: web\r\n\r\n")
            held.append(st)
        with pytest.raises(HboneError) as err:
            await wp.stream()
        assert err.value.status == 503
    finally:
        for st in held:
            st.close()
    await _wait_backend_idle(wp)
    await _clean(wp, baseline)


async def test_idle_connections_are_closed(wp: Waypoint, baseline: tuple[int, int]) -> None:
    """Connections that stay open doing nothing go after --idle-timeout (2 s): HTTP/1.1 is
    closed, HTTP/2 gets GOAWAY NO_ERROR."""
    st = await wp.stream()
    c = H2Client(await wp.stream())
    try:
        st.send(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")  # keep-alive
        assert await c.response(c.request("/")) == 200
        await asyncio.wait_for(st.inner.eof.wait(), 15)
        assert bytes(st.inner.data).startswith(b"HTTP/1.1 200")
        await c.wait(lambda evs: c.goaway() is not None, within=15)
        ga = c.goaway()
        assert ga is not None and ga.error_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        st.close()
        c.st.close()
    await _clean(wp, baseline)


async def test_config_dump_shows_the_limits(wp: Waypoint) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", wp.ports["admin"])
    w.write(b"GET /config_dump HTTP/1.1\r\n\r\n")
    raw = await r.read(-1)
    w.close()
    limits = json.loads(raw.split(b"\r\n\r\n", 1)[1])["limits"]
    assert limits["max_concurrent_streams"] == int(LIMITS["--max-concurrent-streams"])
    assert limits["headers_timeout"] == float(LIMITS["--headers-timeout"])
    assert limits["max_header_bytes"] == int(LIMITS["--max-header-bytes"])


async def test_refusals_are_in_metrics_and_access_log(wp: Waypoint) -> None:
    """Runs last: the flags Istio names, in the metric and the access log."""
    await wp.h1(SMUGGLING["cl-and-te"])
    metrics = await wp.metrics()
    assert 'ambientmesh_waypoint_refused_total{reason="bad_request",response_flags="DPE"}' in (
        metrics
    )
    assert 'response_flags="DPE"' in metrics and 'response_code="400"' in metrics
    for reason, flag in [
        ("header_too_large", "DPE"),
        ("uri_too_long", "DPE"),
        ("headers_timeout", "SI"),
        ("max_concurrent_streams", "OM"),
        ("rapid_reset", "OM"),
        ("control_frame_flood", "OM"),
        ("too_many_headers", "DPE"),
        ("max_connections", "OM"),
    ]:
        assert f'reason="{reason}",response_flags="{flag}"' in metrics, reason
    flags = set()
    for line in wp.log.read_text().splitlines():
        i = line.find("{")
        if i >= 0 and '"response_flags"' in line:
            flags.add(json.loads(line[i:])["response_flags"])
    assert {"DPE", "SI", "OM"} <= flags, flags
