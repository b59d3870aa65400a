"""Flow records, the bounded ring and its filters (mesh.flows), without sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh.flows import (
    Flow,
    FlowFilter,
    FlowRing,
    FlowStreamParams,
    format_time,
    parse_time,
)


def flow(**kw: object) -> Flow:
    base: dict[str, object] = dict(
        time=1_764_472_365.123,
        node="node1",
        reporter="ztunnel",
        proxy="ztunnel-node1",
        src_namespace="default",
        src_pod="sleep-7d9f",
        src_identity="spiffe://cluster.local/ns/default/sa/sleep",
        src_ip="10.0.1.2",
        dst_namespace="default",
        dst_pod="httpbin-5c4b",
        dst_identity="spiffe://cluster.local/ns/default/sa/httpbin",
        dst_ip="10.0.2.3",
        dst_port=8080,
        dst_service="httpbin.default",
        mtls=True,
        duration_ms=1.25,
    )
    base.update(kw)
    return Flow(**base)  # type: ignore[arg-type]


def test_round_trip_is_the_contract() -> None:
    f = flow(protocol="h2", method="GET", path="/get", status=200, authority="httpbin:8080")
    d = f.to_dict()
    assert d["time"] == "2025-11-30T03:12:45.123Z"
    assert d["source"]["pod"] == "sleep-7d9f" and d["destination"]["service"] == "httpbin.default"
    assert d["l7"] == {
        "method": "GET",
        "authority": "httpbin:8080",
        "path": "/get",
        "status": 200,
        "grpc_status": None,
    }
    assert set(d) == {
        "time", "node", "reporter", "proxy", "source", "destination", "protocol", "l7",
        "verdict", "policy", "reason", "mtls", "duration_ms", "latency_ms", "bytes_sent",
        "bytes_received",
    }  # fmt: skip
    back = Flow.from_dict(d)
    assert back.to_dict() == d
    assert flow().to_dict()["l7"] is None  # plain TCP


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"time": 5, "verdict": "FORWARDED"},
        {"time": "2025-11-30T03:12:45Z", "verdict": "MAYBE"},
        {"time": "2025-11-30T03:12:45Z", "verdict": "DENIED", "source": "x"},
        {"time": "2025-11-30T03:12:45Z", "verdict": "DENIED", "bytes_sent": "1"},
        {"time": "yesterday", "verdict": "DENIED"},
    ],
)
def test_from_dict_refuses_what_is_not_a_flow(bad: object) -> None:
    with pytest.raises(ValueError):
        Flow.from_dict(bad)  # type: ignore[arg-type]


def test_times() -> None:
    assert parse_time("2025-11-30T03:12:45.123Z") == pytest.approx(1_764_472_365.123)
    assert parse_time("1764472365.5") == 1764472365.5
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"


def test_ring_keeps_only_the_newest_and_counts_what_a_reader_lost() -> None:
    ring = FlowRing(3)
    for i in range(5):
        ring.record(flow(bytes_sent=i))
    assert len(ring) == 3
    got, lost = ring.since(0)
    assert [f.bytes_sent for f in got] == [2, 3, 4] and lost == 2
    got, lost = ring.since(3)
    assert [f.bytes_sent for f in got] == [3, 4] and lost == 0
    assert ring.since(5) == ([], 0)


def test_lazy_flows_are_built_once_when_read_and_a_broken_builder_costs_only_its_flow() -> None:
    ring = FlowRing(8)
    built: list[int] = []

    def build(i: int) -> Flow:
        built.append(i)
        if i == 1:
            raise KeyError("bug")
        return flow(bytes_sent=i)

    for i in range(3):
        ring.record_lazy(build, i)
    assert built == []  # nothing built on the hot path
    got, lost = ring.since(0)
    assert [f.bytes_sent for f in got] == [0, 2] and lost == 1
    ring.since(0)
    assert built == [0, 1, 2, 1]  # built ones are kept; the broken one is tried again


def test_size_zero_records_nothing() -> None:
    ring = FlowRing(0)
    ring.record(flow())
    assert not ring.enabled and len(ring) == 0 and ring.seq == 0
    with pytest.raises(ValueError):
        FlowRing(-1)


def q(**kw: str) -> FlowFilter:
    return FlowFilter.from_query(kw)


def test_filters_match_like_hubble() -> None:
    f = flow()
    assert q().matches(f)
    assert q(namespace="default").matches(f) and not q(namespace="other").matches(f)
    assert q(pod="sleep").matches(f) and q(pod="default/httpbin").matches(f)
    assert not q(pod="other/sleep").matches(f)
    assert q(from_pod="sleep").matches(f) and not q(from_pod="httpbin").matches(f)
    assert q(to_pod="httpbin").matches(f) and not q(to_pod="sleep").matches(f)
    assert q(to_service="httpbin").matches(f) and q(to_service="default/httpbin").matches(f)
    assert q(to_service="httpbin.default").matches(f) and not q(to_service="http").matches(f)
    assert q(identity="default/sleep").matches(f)
    assert q(identity="spiffe://cluster.local/ns/default/sa/httpbin").matches(f)
    assert not q(identity="default/nobody").matches(f)
    assert q(verdict="forwarded,denied").matches(f) and not q(verdict="DROPPED").matches(f)
    assert q(protocol="tcp").matches(f) and not q(protocol="http").matches(f)
    h = flow(protocol="h2", status=503)
    assert q(protocol="http").matches(h) and q(http_status="5+").matches(h)
    assert q(http_status="5xx").matches(h) and q(http_status="503").matches(h)
    assert not q(http_status="200").matches(h) and not q(http_status="200").matches(f)
    assert q(since="2025-11-30T03:12:00Z").matches(f)
    assert not q(since="2025-11-30T03:13:00Z").matches(f)
    # different filters AND, values OR
    assert not q(namespace="default", verdict="DENIED").matches(f)


@pytest.mark.parametrize(
    "bad",
    [
        {"verdict": "ALLOW"},
        {"protocol": "udp"},
        {"http_status": "600"},
        {"http_status": "abc"},
        {"pod": "a/b/c"},
        {"pod": "UPPER"},
        {"namespace": ""},
        {"namespace": "x" * 300},
        {"since": "last tuesday"},
        {"identity": "a b"},
        {"verdict": ",".join(["DENIED"] * 100)},
    ],
)
def test_bad_filters_are_named(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FlowFilter.from_query(bad)


@pytest.mark.parametrize(
    "bad", [{"last": "-1"}, {"last": "x"}, {"follow": "maybe"}, {"colour": "red"}]
)
def test_bad_stream_params(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        FlowStreamParams.from_query(bad)


def test_query_round_trip() -> None:
    raw = {
        "namespace": "default,other",
        "pod": "default/sleep",
        "to_service": "httpbin.default",
        "verdict": "DENIED",
        "protocol": "http",
        "http_status": "5xx,200",
        "since": "1764472365.5",
        "last": "3",
        "follow": "1",
    }
    p = FlowStreamParams.from_query(raw)
    assert FlowStreamParams.from_query(p.to_query()) == p
    assert p.last == 3 and p.follow


def test_stream_last_then_follow() -> None:
    async def main() -> None:
        ring = FlowRing(100)
        for i in range(5):
            ring.record(flow(bytes_sent=i, verdict="DENIED" if i % 2 else "FORWARDED"))
        params = FlowStreamParams.from_query({"verdict": "DENIED", "last": "1", "follow": "1"})
        it = aiter(ring.stream(params))
        first = await anext(it)
        assert [d["bytes_sent"] for d in first] == [3]
        nxt = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0)
        ring.record(flow(bytes_sent=10))  # filtered out
        ring.record(flow(bytes_sent=11, verdict="DENIED"))
        got = await asyncio.wait_for(nxt, 5)
        assert [d["bytes_sent"] for d in got] == [11]
        await it.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_reader_that_falls_behind_is_told_what_it_lost() -> None:
    async def main() -> None:
        ring = FlowRing(4)
        it = aiter(ring.stream(FlowStreamParams(follow=True)))
        nxt = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0)
        for i in range(10):  # all before the reader runs again
            ring.record(flow(bytes_sent=i))
        got = await asyncio.wait_for(nxt, 5)
        assert got[0] == {"lost_events": 6}
        assert [d["bytes_sent"] for d in got[1:]] == [6, 7, 8, 9]
        await it.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_recording_is_cheap() -> None:
    """Not a timed assertion: prints the figure (the benchmark measures it in a proxy)."""
    ring = FlowRing(4096)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        ring.record(flow())
    dt = (time.perf_counter() - t0) / n
    print(f"build+record one flow: {dt * 1e6:.2f} us")
    assert len(ring) == 4096
