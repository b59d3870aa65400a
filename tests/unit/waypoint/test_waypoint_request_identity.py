"""x-request-id, x-forwarded-for and x-forwarded-proto on requests the waypoint forwards."""

from __future__ import annotations

import uuid

from waypoint.request import forwarded_node, with_request_identity
from waypoint.routing import Request


def headers(
    hs: list[tuple[str, str]], ip: str = "10.0.0.7", scheme: str = "http"
) -> dict[str, str]:
    req = Request.from_target("GET", "/x", hs, host="svc")
    out = with_request_identity(req, ip, scheme).headers
    names = [k for k, _ in out]
    assert len(names) == len(set(names)), out  # one of each, never duplicated
    return dict(out)


def test_request_id_generated_when_absent_and_unique() -> None:
    a, b = headers([])["x-request-id"], headers([])["x-request-id"]
    assert uuid.UUID(a).version == 4 and a != b


def test_request_id_kept_when_present() -> None:
    assert headers([("X-Request-Id", "abc-123")])["x-request-id"] == "abc-123"
    assert headers([("x-request-id", "")])["x-request-id"] != ""


def test_forwarded_for_appends_the_caller() -> None:
    assert headers([])["x-forwarded-for"] == "10.0.0.7"
    hs = [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2, 3.3.3.3")]
    assert headers(hs)["x-forwarded-for"] == "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7"
    assert "x-forwarded-for" not in headers([], ip="")  # no known caller: claim nothing


def test_forwarded_proto_is_the_callers_scheme_not_its_claim() -> None:
    assert headers([("x-forwarded-proto", "https")])["x-forwarded-proto"] == "http"
    assert headers([], scheme="https")["x-forwarded-proto"] == "https"
    assert headers([], scheme="gopher")["x-forwarded-proto"] == "http"


# -- Forwarded (RFC 7239), with the waypoint's --forwarded -----------------------------------


def fwd(hs: list[tuple[str, str]], ip: str = "10.0.0.7", scheme: str = "http") -> str | None:
    req = Request.from_target("GET", "/x", hs, host="svc")
    out = with_request_identity(req, ip, scheme, forwarded_by="_waypoint.shop").headers
    values = [v for k, v in out if k == "forwarded"]
    assert len(values) <= 1, out  # one header, elements comma-joined
    return values[0] if values else None


def test_forwarded_is_off_unless_configured() -> None:
    assert "forwarded" not in headers([])
    assert headers([("forwarded", "for=1.2.3.4")])["forwarded"] == "for=1.2.3.4"  # untouched


def test_forwarded_element_has_for_by_and_proto() -> None:
    assert fwd([]) == "for=10.0.0.7;by=_waypoint.shop;proto=http"
    assert fwd([], scheme="https") == "for=10.0.0.7;by=_waypoint.shop;proto=https"
    assert fwd([], scheme="gopher") == "for=10.0.0.7;by=_waypoint.shop;proto=http"
    assert fwd([], ip="") == "by=_waypoint.shop;proto=http"  # no known caller: claim nothing


def test_forwarded_quotes_ipv6_and_appends_to_what_the_caller_sent() -> None:
    """Section 6: an IPv6 address is bracketed and, since `:` is not a token character,
    quoted. The caller's own elements stay first, as x-forwarded-for's."""
    assert (
        fwd([], ip="2001:db8:cafe::17") == 'for="[2001:db8:cafe::17]";by=_waypoint.shop;proto=http'
    )
    prior = [("forwarded", 'for=192.0.2.43, for="[2001:db8::1]:4711"'), ("forwarded", "for=x")]
    assert fwd(prior) == (
        'for=192.0.2.43, for="[2001:db8::1]:4711", for=x, for=10.0.0.7;by=_waypoint.shop;proto=http'
    )


def test_forwarded_node_quoting() -> None:
    assert forwarded_node("192.0.2.60") == "192.0.2.60"
    assert forwarded_node("::1") == '"[::1]"'
    assert forwarded_node("_hidden") == "_hidden"
    assert forwarded_node('we"ird\\') == '"we\\"ird\\\\"'
    assert forwarded_node("naïve") == '"naïve"'  # not a token: quoted


def test_one_pass_keeps_the_callers_order_and_appends_ours_last() -> None:
    """What the single pass over the headers must produce, pinned: the caller's own headers
    in their order, then x-request-id (when generated), x-forwarded-for, x-forwarded-proto,
    forwarded."""
    hs = [("accept", "*/*"), ("x-forwarded-for", "1.1.1.1"), ("x-request-id", ""),
          ("forwarded", "for=1.1.1.1"), ("x-forwarded-proto", "https"), ("x-b3", "1")]  # fmt: skip
    req = Request.from_target("GET", "/x", hs, host="svc")
    out = with_request_identity(req, "10.0.0.7", "http", "_wp.ns").headers
    assert [k for k, _ in out] == [
        "accept", "x-b3", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "forwarded"
    ]  # fmt: skip
    d = dict(out)
    assert d["forwarded"] == "for=1.1.1.1, for=10.0.0.7;by=_wp.ns;proto=http"
    assert d["x-forwarded-for"] == "1.1.1.1, 10.0.0.7"
    kept = with_request_identity(
        Request.from_target("GET", "/", [("x-request-id", "r1")]), "", "http"
    )
    assert [k for k, _ in kept.headers] == ["x-request-id", "x-forwarded-proto"]


def test_generated_request_ids_are_version_4_uuids() -> None:
    ids = {headers([])["x-request-id"] for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        u = uuid.UUID(rid)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, rid)


def test_callers_trace_headers_are_replaced_by_ours_at_the_end() -> None:
    from mesh.tracecontext import continue_trace

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    hs = [("traceparent", tp), ("accept", "*/*"), ("tracestate", "k=v")]
    tc = continue_trace(hs)
    req = Request.from_target("GET", "/", hs, host="svc")
    out = with_request_identity(req, "10.0.0.7", "http", None, tc).headers
    assert [k for k, _ in out] == ["accept", "x-request-id", "x-forwarded-for",
                                   "x-forwarded-proto", "traceparent", "tracestate"]  # fmt: skip
    d = dict(out)
    assert d["traceparent"] == f"00-{tc.trace_id}-{tc.span_id}-01" and tc.trace_id in tp
    assert d["tracestate"] == "k=v" and tc.span_id not in tp
