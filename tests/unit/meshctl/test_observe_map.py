"""The service map: aggregation (rates, error rates, p99, mTLS, denials) and label escaping."""

from __future__ import annotations

import math
import os
import shutil
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from meshctl.observe.map import (
    FlowLike,
    MapError,
    build_graph,
    dot_label,
    edge_lines,
    p99,
    render_map,
    to_dot,
    workload_of,
)
from tests.fakes.recorded_flows import (
    BATCH,
    DENY_POLICY,
    HOSTILE_POD,
    SERVER,
    WEB,
    demo_flows,
    flow,
    lab_demo_flows,
)

SVG = "{http://www.w3.org/2000/svg}"


def need_dot() -> None:
    if shutil.which("dot") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("graphviz `dot` is missing in CI: scripts/setup.sh installs graphviz")
        pytest.skip("graphviz `dot` not installed (apt-get install graphviz)")


def edges_by(flows: list[dict[str, Any]]) -> dict[tuple[str, str, bool], Any]:
    return {(e.source, e.destination, e.denied): e for e in build_graph(flows).edges}


def test_demo_flows_make_the_demo_map() -> None:
    graph = build_graph(demo_flows())
    assert graph.nodes["server.shop"] == "service"
    assert graph.nodes["reviews.bookinfo"] == "service"
    assert graph.nodes["shop/web"] == "workload"
    assert graph.nodes["10.96.0.99:80"] == "address"
    assert graph.span_s == pytest.approx(20.0)
    edges = {(e.source, e.destination, e.denied): e for e in graph.edges}

    web = edges["shop/web", "server.shop", False]
    assert web.requests == 10
    assert web.rps == pytest.approx(0.5)  # 10 over the 20 s the flows span
    assert web.p99_ms == 10.0
    assert web.encryption == "mTLS"
    assert web.error_rate == 0

    denied = edges["shop/batch", "server.shop", True]
    assert denied.policies == (DENY_POLICY,)
    assert edge_lines(denied)[0] == f"DENIED by {DENY_POLICY}"
    assert ("shop/batch", "server.shop", False) not in edges
    assert graph.edges[0] is denied  # denials are listed first

    assert edges["legacy/curl", "server.shop", False].encryption == "plaintext"

    # Through the waypoint: the waypoint's four requests, not ztunnel's four connections too,
    # and one 503 of four is a 25% error rate.
    reviews = edges["bookinfo/productpage", "reviews.bookinfo", False]
    assert (reviews.requests, reviews.errors) == (4, 1)
    assert reviews.error_rate == pytest.approx(0.25)

    dropped = edges["shop/web", "10.96.0.99:80", False]
    assert dropped.errors == 1 and dropped.reasons == ("no route",)


def test_a_real_labs_flows_make_one_edge_per_caller_and_service() -> None:
    """Both ends' ztunnels report each connection; the destination's end knows the pod, not
    the Service, and only it names the denying policy. The map still has one edge per caller
    and Service, each connection counted once."""
    graph = build_graph(lab_demo_flows())
    edges = {(e.source, e.destination, e.denied): e for e in graph.edges}
    assert set(edges) == {
        ("shop/batch", "server.shop", True),
        ("shop/web", "server.shop", False),
        ("legacy/curl", "server.shop", False),
        ("bookinfo/productpage", "reviews.bookinfo", False),
    }
    assert graph.nodes["server.shop"] == "service"
    denied = edges["shop/batch", "server.shop", True]
    assert (denied.requests, denied.policies) == (3, (DENY_POLICY,))
    assert edges["shop/web", "server.shop", False].requests == 5
    assert edges["shop/web", "server.shop", False].encryption == "mTLS"
    curl = edges["legacy/curl", "server.shop", False]  # outside the mesh: one end reports
    assert (curl.requests, curl.encryption) == (3, "plaintext")
    assert edges["bookinfo/productpage", "reviews.bookinfo", False].requests == 4


def test_error_rate_counts_5xx_grpc_failures_and_drops_not_4xx() -> None:
    def l7(status: int, grpc: int | None = None) -> dict[str, Any]:
        return {"method": "POST", "authority": "a", "path": "/", "status": status,
                "grpc_status": grpc}  # fmt: skip

    flows = [
        flow(0, WEB, SERVER, reporter="waypoint", l7=l7(200)),
        flow(1, WEB, SERVER, reporter="waypoint", l7=l7(404)),
        flow(2, WEB, SERVER, reporter="waypoint", l7=l7(502)),
        flow(3, WEB, SERVER, reporter="waypoint", l7=l7(200, 14)),
        flow(4, WEB, SERVER, reporter="waypoint", l7=l7(200, 0)),
        flow(5, WEB, SERVER, reporter="waypoint", verdict="DROPPED", reason="overload"),
    ]
    edge = edges_by(flows)["shop/web", "server.shop", False]
    assert (edge.requests, edge.errors) == (6, 3)
    assert edge.reasons == ("overload",)


def test_mixed_encryption_is_said_so() -> None:
    flows = [flow(0, WEB, SERVER, mtls=True), flow(1, WEB, SERVER, mtls=False, src_port=1)]
    assert edges_by(flows)["shop/web", "server.shop", False].encryption == "mixed"


def test_a_partly_denied_pair_gets_two_edges() -> None:
    flows = [flow(0, BATCH, SERVER), flow(1, BATCH, SERVER, verdict="DENIED", policy="shop/p")]
    edges = edges_by(flows)
    assert edges["shop/batch", "server.shop", False].requests == 1
    assert edges["shop/batch", "server.shop", True].policies == ("shop/p",)


def test_one_connection_reported_by_both_ends_counts_once() -> None:
    flows = [
        flow(0, WEB, SERVER, proxy="ztunnel-node1"),
        flow(0, WEB, SERVER, proxy="ztunnel-node2"),  # the other end of the same connection
        flow(9, WEB, SERVER, proxy="ztunnel-node1"),  # the source port reused later: another
    ]
    assert edges_by(flows)["shop/web", "server.shop", False].requests == 2


def test_p99_is_an_observed_value_by_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99([float(v) for v in range(1, 201)]) == 198.0
    assert p99([float(v) for v in range(100, 0, -1)]) == 99.0


def test_a_backend_that_calls_onward_sits_on_the_map_as_its_service() -> None:
    productpage = ("bookinfo", "productpage-6f8b9c7d5-abc12", "10.1.0.1")
    reviews = ("bookinfo", "reviews-v1-7f9c8d6b5-x2k9q", "10.1.0.2", 9080, "reviews.bookinfo")
    ratings = ("bookinfo", "ratings-v1-5d8f7c9b4-qq7zz", "10.1.0.3", 9080, "ratings.bookinfo")
    graph = build_graph([flow(0, productpage, reviews), flow(1, ("bookinfo", reviews[1],
                        reviews[2]), ratings)])  # fmt: skip
    pairs = {(e.source, e.destination) for e in graph.edges}
    assert pairs == {
        ("bookinfo/productpage", "reviews.bookinfo"),
        ("reviews.bookinfo", "ratings.bookinfo"),
    }


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("reviews-v1-7f9c8d6b5-x2k9q", "reviews-v1"),
        ("web", "web"),
        ("db-0", "db-0"),
        ("my-app", "my-app"),
        ("hello-world", "hello-world"),
        ("agent-x7k2p", "agent"),  # a DaemonSet pod: name plus a five-character suffix
    ],
)
def test_workload_of(pod: str, workload: str) -> None:
    assert workload_of(pod) == workload


def test_records_that_are_not_flows_are_skipped_not_fatal() -> None:
    good = flow(0, WEB, SERVER)
    bad: list[Any] = [
        "not a record",
        None,
        {},
        {"source": "x", "destination": 7},
        {"source": {"pod": ["x"]}, "destination": {"service": {"a": 1}}},
        {**good, "latency_ms": math.nan, "time": "yesterday", "mtls": "yes"},
        {**good, "source": {"namespace": "shop", "pod": "web", "ip": ["a"], "port": {}}},
        {**good, "l7": {"status": "500", "grpc_status": True}},
    ]
    graph = build_graph([good, *bad])
    edge = next(e for e in graph.edges if e.source == "shop/web")
    assert edge.requests == 4
    assert edge.errors == 0  # "500" (a string) and True are not statuses
    assert edge.plaintext == 1  # "yes" is not True
    assert graph.skipped == 5


def test_a_flood_of_names_draws_the_busiest_edges_and_says_how_many_it_left_out() -> None:
    flows = [flow(0, ("evil", f"pod-{i}", "10.9.0.1"), SERVER, src_port=i) for i in range(500)]
    flows += [flow(1, WEB, SERVER, src_port=70000 + i) for i in range(3)]
    flows.append(flow(2, BATCH, SERVER, verdict="DENIED", policy=DENY_POLICY))
    graph = build_graph(flows, max_edges=50)
    assert len(graph.edges) == 50
    assert graph.omitted_edges == 452
    assert graph.edges[0].denied and graph.edges[1].source == "shop/web"
    assert len(graph.nodes) == 51
    assert "452 quieter edges not drawn" in to_dot(graph)


HOSTILE_NAMES = [
    HOSTILE_POD,
    'a"] ; n0 -> n1 [label="pwned',
    "back\\slash \\N \\G \\n \\l",
    "&lt;script&gt;alert(1)&lt;/script&gt; &#60;b&#62; &amp;",
    "line1\nline2\r\x00\x1b[31m",
    "}}} digraph { ",
    "ünïcødé ✓ 🔒",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_dot_label_is_one_quoted_string_with_no_live_escapes(name: str) -> None:
    label = dot_label(name)
    body = label[1:-1]
    assert label[0] == label[-1] == '"'
    i = 0
    while i < len(body):  # every backslash is either escaped or escapes a quote
        if body[i] == "\\":
            assert body[i + 1] in '\\"'
            i += 2
            continue
        assert body[i] != '"' and body[i] != "\n"
        i += 1


def _svg_texts(svg: bytes) -> list[str]:
    root = ET.fromstring(svg)
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_render_in_svg_exactly_as_text(name: str) -> None:
    need_dot()
    flows = [flow(0, ("shop", name, "10.1.1.1"), SERVER)]
    svg = render_map(flows, "svg")
    root = ET.fromstring(svg)
    assert not list(root.iter(f"{SVG}script")) and not list(root.iter(f"{SVG}a"))
    assert not any(k.startswith("on") for el in root.iter() for k in el.attrib)
    expected = "shop/" + name.replace("\n", "\ufffd").replace("\r", "\ufffd")
    expected = expected.replace("\x00", "\ufffd").replace("\x1b", "\ufffd")
    # graphviz writes one <text> per line: the name is one line, shown exactly.
    assert expected in _svg_texts(svg)
    assert b"<img" not in svg and b"<script" not in svg


def test_render_map_svg_marks_the_denied_edge() -> None:
    need_dot()
    svg = render_map(demo_flows(), "svg")
    root = ET.fromstring(svg)
    texts = _svg_texts(svg)
    for service in ("server.shop", "reviews.bookinfo", "shop/web", "shop/batch", "legacy/curl"):
        assert service in texts
    denied = [g for g in root.iter(f"{SVG}g") if "edge-denied" in g.get("class", "").split()]
    assert len(denied) == 1
    path = denied[0].find(f"{SVG}path")
    assert path is not None
    assert path.get("stroke") == "#cc0000" and path.get("stroke-dasharray")
    assert f"DENIED by {DENY_POLICY}" in ["".join(t.itertext()) for t in denied[0].iter()]


def test_render_map_png_and_dot() -> None:
    need_dot()
    assert render_map(demo_flows(), "png").startswith(b"\x89PNG\r\n\x1a\n")
    dot = render_map(demo_flows(), "dot").decode()
    assert dot.startswith("digraph mesh {") and "edge-denied" in dot
    assert render_map([], "svg").startswith(b"<?xml")  # an empty map still draws


def test_render_map_refuses_unknown_formats() -> None:
    with pytest.raises(MapError, match="must be one of png, svg, dot"):
        render_map(demo_flows(), "pdf")


def test_render_map_without_graphviz_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MapError, match="apt-get install graphviz"):
        render_map(demo_flows(), "svg")
    assert render_map(demo_flows(), "dot")  # DOT needs no graphviz


class _FlowObject:
    """Stands for `mesh.flows.Flow`: an object whose `to_dict()` gives the contract's shape."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def to_dict(self) -> dict[str, Any]:
        return self.record


class _Broken:
    def to_dict(self) -> dict[str, Any]:
        raise ValueError("no")


def test_flow_objects_with_to_dict_are_taken_as_records() -> None:
    as_dicts = build_graph(demo_flows())
    items: list[FlowLike] = [_FlowObject(f) for f in demo_flows()]
    as_objects = build_graph([*items, _Broken()])
    assert as_objects.edges == as_dicts.edges
    assert as_objects.skipped == 1
