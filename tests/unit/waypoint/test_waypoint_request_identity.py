"""x-request-id, x-forwarded-for and x-forwarded-proto on requests the waypoint forwards."""

from __future__ import annotations

import uuid

from waypoint.request import with_request_identity
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
