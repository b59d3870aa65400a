"""`meshctl observe`: flags to the proxies' query, merging, output formats, lab discovery."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from mesh.flows import Flow
from meshctl.cli import build_parser, main
from meshctl.errors import UsageError
from meshctl.lab.state import LabState
from meshctl.observe import output
from meshctl.observe.filters import params_from_args, parse_since, select
from meshctl.observe.sources import LabSource, lab_sources

NOW = 1_764_472_365.0


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["observe", *argv])


def test_flags_become_the_query() -> None:
    p = params_from_args(
        args("-n", "default", "--namespace", "shop", "--verdict", "denied", "--to-service",
             "default/httpbin", "--http-status", "5+", "--since", "5m", "--last", "3", "-f"),
        now=NOW,
    )  # fmt: skip
    q = p.to_query()
    assert q["namespace"] == "default,shop" and q["verdict"] == "DENIED"
    assert q["to_service"] == "httpbin.default" and q["http_status"] == "5xx"
    assert float(q["since"]) == NOW - 300 and q["last"] == "3" and q["follow"] == "1"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--verdict", "ALLOWED"], "--verdict"),
        (["--since", "a while"], "--since"),
        (["--http-status", "99"], "--http-status"),
        (["--pod", "a/b/c"], "--pod"),
        (["--last", "-1"], "--last"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        params_from_args(args(*argv))


def test_main_exits_2_on_a_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["observe", "--verdict", "nope"]) == 2
    assert "--verdict" in capsys.readouterr().err


def test_since_forms() -> None:
    assert parse_since("90s", NOW) == NOW - 90
    assert parse_since("2h", NOW) == NOW - 7200
    assert parse_since("1764472365") == 1764472365.0


def f(t: float, **kw: object) -> Flow:
    base: dict[str, object] = dict(
        time=t, src_namespace="default", src_pod="sleep-1", src_ip="10.0.0.1", src_port=43210,
        src_identity="spiffe://cluster.local/ns/default/sa/sleep", dst_namespace="default",
        dst_pod="httpbin-1", dst_ip="10.0.0.2", dst_port=8080, dst_service="httpbin.default",
        mtls=True, duration_ms=1.23,
    )  # fmt: skip
    base.update(kw)
    return Flow(**base)  # type: ignore[arg-type]


def test_default_is_the_last_20_like_hubble() -> None:
    assert params_from_args(args()).last == 20
    assert params_from_args(args("--all")).last is None
    assert params_from_args(args("-f")).last is None
    assert params_from_args(args("--since", "1m")).last is None


def test_last_is_across_all_sources_oldest_first() -> None:
    flows = [f(3), f(1), f(2, verdict="DENIED"), f(4)]
    p = params_from_args(args("--last", "2"))
    assert [x.time for x in select(flows, p)] == [3, 4]
    p = params_from_args(args("--verdict", "DENIED"))
    assert [x.time for x in select(flows, p)] == [2]


def test_compact_line_reads_like_hubble() -> None:
    line = output.compact(f(NOW, protocol="h2", method="GET", path="/get", status=200))
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(NOW))
    assert line == (
        f"{stamp}.000: default/sleep-1:43210 (ID spiffe://cluster.local/ns/default/sa/sleep) "
        "-> default/httpbin-1:8080 http-request FORWARDED (mTLS) GET /get => 200 1.2ms"
    )
    denied = output.compact(f(NOW, verdict="DENIED", policy="default/deny-all", mtls=False))
    assert "tcp DENIED (plaintext) policy default/deny-all" in denied
    dropped = output.compact(f(NOW, verdict="DROPPED", reason="no route", dst_pod=None))
    assert "(service httpbin.default)" in dropped and "reason 'no route'" in dropped


def test_json_is_the_contract_and_table_aligns() -> None:
    flows = [f(NOW), f(NOW + 1, verdict="DENIED", policy="default/x")]
    lines = output.render(flows, "json").splitlines()
    assert [json.loads(x)["verdict"] for x in lines] == ["FORWARDED", "DENIED"]
    tab = output.render(flows, "table").splitlines()
    assert tab[0].startswith("TIME") and len(tab) == 3
    col = tab[0].index("VERDICT")
    assert tab[2][col:].startswith("DENIED default/x")
    assert output.render([], "compact") == ""


def test_lab_sources_are_every_node_and_every_waypoint(tmp_path: Path) -> None:
    st = LabState("t", tmp_path / "labs" / "t.json")
    st.nodes = {"node2": {"netns": "t-node2"}, "node1": {"netns": "t-node1"}}
    st.pods = {
        "default/sleep": {"netns": "t-sleep", "ip": "10.0.0.1"},
        "default/waypoint-0-lab": {"netns": "t-wp", "ip": "10.0.0.9"},
    }
    st.save()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        "kind: Pod\nmetadata: {name: sleep, namespace: default}\n---\n"
        "kind: Pod\nmetadata: {name: waypoint-0-lab, namespace: default,\n"
        "  labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n"
    )
    got = lab_sources(st.path, manifest)
    assert [s.name for s in got] == [
        "ztunnel-node1",
        "ztunnel-node2",
        "waypoint default/waypoint-0-lab",
    ]
    assert all(isinstance(s, LabSource) for s in got)
    assert [s.netns for s in got if isinstance(s, LabSource)] == ["t-node1", "t-node2", "t-wp"]


def test_missing_lab_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["observe", "--lab", "nolab", "--state-root", str(tmp_path)]) == 2
    assert "no lab state" in capsys.readouterr().err


def test_hostile_names_cannot_drive_the_terminal() -> None:
    evil = f(NOW, src_pod="x\x1b[2J\x1b]0;pwned\x07", path="/a\rb", method="GET", status=200)
    for text in (output.compact(evil), output.table([evil])):
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text
        assert "\\x1b[2J" in text  # shown, escaped
