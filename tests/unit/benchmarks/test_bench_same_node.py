"""The same-node modes: the server beside the client, each variant of ztunnel chosen by its
flags, and the report's side-by-side section with the ratios local delivery and the sockmap
each buy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import modes as M
from benchmarks import report
from mesh.config.parse import parse_objects
from meshctl.lab.lab import Lab
from meshctl.lab.names import LabPaths
from tests.unit.benchmarks.test_bench_report import run
from ztunnel.main import build_parser


def test_same_node_modes_put_the_server_beside_the_client() -> None:
    lab = Lab(LabPaths("bt1", state_root=Path("/nonexistent-bench")), out=lambda _m: None)
    for name in report.SAME_NODE:
        mode = M.MODES[name]
        snap = parse_objects(M.manifest(mode, 2, lab))
        client, server = snap.pod(M.NAMESPACE, "client"), snap.pod(M.NAMESPACE, "server")
        assert client is not None and server is not None
        assert client.node == server.node == M.NODES[0], name
        assert snap.is_ambient(server) == mode.ambient
        argv = ["--node", "n1", "--config", "x", "--ca-dir", "y", *mode.ztunnel_args]
        build_parser().parse_args(argv)  # ztunnel takes the mode's flags
    flags = {n: M.MODES[n].ztunnel_args for n in report.SAME_NODE}
    assert flags["ambient-samenode-hbone"][:2] == ("--local-delivery", "off")
    assert flags["ambient-sockmap"][2:] == ("--fastpath", "on")
    assert flags["ambient-samenode"][2:] == ("--fastpath", "off")


def test_same_node_section_sets_the_modes_side_by_side_with_ratios() -> None:
    def mode(title: str, p50: float, cpu: float, bulk: float) -> dict[str, Any]:
        return {"status": "ok", "title": title, "bulk": {"ok": True, "mib_per_s": bulk},
                "runs": [run("http/1.1", 0, 1000.0, p50, p50 * 3, 1000, cpu=cpu),
                         run("http/1.1", 0, 0.0, 5.0, 9.0, 4000)]}  # fmt: skip

    res = {"modes": {
        "nomesh-samenode": mode("no mesh, same node", 0.2, 0.0, 2000.0),
        "ambient-samenode-hbone": mode("hbone", 1.0, 0.4, 300.0),
        "ambient-samenode": mode("local", 0.5, 0.2, 900.0),
        "ambient-sockmap": {"status": "skipped", "reason": "no BPF"},
    }}  # fmt: skip
    text = report.same_node_section(res, reference_rate=1000.0)
    assert text.startswith("## Same node")
    row = next(ln for ln in text.splitlines() if ln.startswith("| local delivery / HBONE"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == [
        "0.50x", "0.50x", "0.50x", "1.00x", "3.00x"
    ]  # fmt: skip
    assert "0.45" in text  # local bulk / same-node no mesh
    assert "sockmap" not in text.split("ratio", 1)[1]  # a mode that did not run: no ratio
    assert report.same_node_section({"modes": {}}, reference_rate=1000.0) == ""
