"""W3C Trace Context parsing (mesh.tracecontext): what continues a trace, what starts a new one,
and that nothing a caller sends reaches the next hop unless the spec allows it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.tracecontext import continue_trace, parse_traceparent, parse_tracestate, with_trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{PARENT}-01"
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    tc = continue_trace([("traceparent", GOOD), ("tracestate", "congo=t61rcWkgMzE")])
    assert (tc.trace_id, tc.parent_id, tc.flags) == (TRACE, PARENT, 1)
    assert tc.span_id != PARENT and re.fullmatch(r"[0-9a-f]{16}", tc.span_id)
    assert tc.traceparent() == f"00-{TRACE}-{tc.span_id}-01"
    assert tc.tracestate == "congo=t61rcWkgMzE"


def test_unsampled_stays_unsampled_and_unknown_flags_are_not_passed_on() -> None:
    assert continue_trace([("traceparent", f"00-{TRACE}-{PARENT}-00")]).flags == 0
    tc = continue_trace([("traceparent", f"00-{TRACE}-{PARENT}-ff")])
    assert tc.flags == 1 and tc.traceparent().endswith("-01")


def test_a_later_version_is_read_for_the_fields_we_know_and_sent_as_00() -> None:
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-what-the-future-holds") == (
        TRACE,
        PARENT,
        1,
    )
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01") == (TRACE, PARENT, 1)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE}-{PARENT}-01extra",  # a later version separates more fields with "-"
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"0-{TRACE}-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f" 00-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-0g",
        f"00-{TRACE}-{PARENT}-01\r\nx-evil: 1",
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(value: str) -> None:
    assert parse_traceparent(value) is None
    tc = continue_trace([("traceparent", value), ("tracestate", "vendor=kept-only-if-valid")])
    assert tc.parent_id is None and tc.trace_id not in (TRACE, "0" * 32)
    assert tc.tracestate is None  # a tracestate rides only on a valid traceparent
    assert tc.flags == 1


def test_two_traceparent_headers_are_invalid() -> None:
    tc = continue_trace([("traceparent", GOOD), ("traceparent", GOOD)])
    assert tc.parent_id is None and tc.trace_id != TRACE


@pytest.mark.parametrize(
    "values, want",
    [
        (["a=1,b=2"], "a=1,b=2"),
        (["a=1", "b=2"], "a=1,b=2"),  # several headers are one list
        (["a=1 , ,  b=2"], "a=1,b=2"),  # empty members and optional whitespace dropped
        (["tenant@system=v"], "tenant@system=v"),
        (["0tenant@sys=v"], "0tenant@sys=v"),
        (["k=" + "x" * 256], "k=" + "x" * 256),
        ([], None),
        ([""], None),
        (["a=1,a=2"], None),  # duplicate key
        (["A=1"], None),  # upper-case key
        (["0a=1"], None),  # a simple key starts with a letter
        (["a=has,comma"], None),
        (["a=trailing "], "a=trailing"),  # whitespace before a comma or the end is OWS
        (["a=x\ty"], None),
        (["a=x\x7f"], None),
        (["a="], None),
        (["novalue"], None),
        (["k=" + "x" * 257], None),
        (["a@toolongsystemid=1"], None),
        ([",".join(f"k{i}=v" for i in range(33))], None),  # more than 32 members
    ],
)
def test_tracestate(values: list[str], want: str | None) -> None:
    assert parse_tracestate(values) == want


def test_with_trace_replaces_the_callers_headers() -> None:
    tc = continue_trace([("traceparent", GOOD), ("tracestate", "a=1")])
    out = with_trace(
        [("x", "1"), ("traceparent", GOOD), ("tracestate", "a=1"), ("tracestate", "b=2")], tc
    )
    assert out == [("x", "1"), ("traceparent", tc.traceparent()), ("tracestate", "a=1")]


@given(
    st.lists(
        st.tuples(st.sampled_from(["traceparent", "tracestate", "x"]), st.text(max_size=80)),
        max_size=4,
    )
)
def test_hostile_headers_never_crash_and_never_pass_through_unchecked(
    headers: list[tuple[str, str]],
) -> None:
    tc = continue_trace(headers)
    out = dict(with_trace(headers, tc))
    assert TRACEPARENT.fullmatch(out["traceparent"])
    state = out.get("tracestate")
    if state is not None:
        assert parse_tracestate([state]) == state
        sent = ",".join(v for k, v in headers if k == "tracestate")
        assert all(member in sent for member in state.split(","))


def test_sampling_decides_only_for_traces_we_start() -> None:
    assert all(not continue_trace([], 0.0).sampled for _ in range(50))
    assert all(continue_trace([], 1.0).sampled for _ in range(50))
    share = sum(continue_trace([], 0.25).sampled for _ in range(4000)) / 4000
    assert 0.15 < share < 0.35  # ~10 standard deviations either side
    # the caller's decision stands, whatever ours would have been
    assert continue_trace([("traceparent", GOOD)], 0.0).sampled
    assert not continue_trace([("traceparent", f"00-{TRACE}-{PARENT}-00")], 1.0).sampled
