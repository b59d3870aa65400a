"""The kTLS comparison's arithmetic (medians, fraction of no mesh, kTLS / user space) and the
lab hook that gives each benchmark mode its own ztunnel flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import ktls_guest as K
from benchmarks import modes as M
from benchmarks import report, suite


def cell(
    mode: str, mib_s: float, p99: float, cpu_req: float | None, ok: bool = True
) -> dict[str, Any]:
    return {
        "mode": mode,
        "ok": ok,
        "bulk": {
            "mib_per_s": mib_s,
            "mesh_cpu_s_per_gib": None if cpu_req is None else 10 * cpu_req,
        },
        "latency": {"p50_ms": p99 / 4, "p99_ms": p99, "mesh_cpu_ms_per_request": cpu_req},
    }


def test_medians_fractions_and_ratios() -> None:
    cells = [
        cell("nomesh", 100.0, 1.0, None), cell("userspace", 20.0, 4.0, 2.0),
        cell("ktls", 60.0, 3.0, 1.0),
        cell("nomesh", 120.0, 1.0, None), cell("userspace", 30.0, 6.0, 3.0),
        cell("ktls", 50.0, 2.0, 1.5),
        cell("nomesh", 110.0, 1.0, None), cell("userspace", 25.0, 5.0, 2.5),
        cell("ktls", 999.0, 0.1, 0.1, ok=False),  # a failed repeat counts for nothing
    ]  # fmt: skip
    s = K.summarize(cells)
    m = s["modes"]
    assert m["nomesh"]["bulk_mib_per_s"] == 110.0
    assert m["userspace"]["bulk_fraction_of_nomesh"] == round(25 / 110, 3)
    assert m["ktls"]["repeats"] == 2 and m["ktls"]["bulk_mib_per_s"] == 55.0
    assert m["ktls"]["bulk_fraction_of_nomesh"] == 0.5
    r = s["ktls_over_userspace"]
    assert r["bulk_mib_per_s"] == 2.2
    assert r["p99_ms"] == 0.5
    assert r["mesh_cpu_ms_per_request"] == 0.5
    sec = report.ktls_guest_section({"ktls_guest": {"status": "ok", "kernel": "6.1.0-x",
                                                    "preset": {"rate": 50.0, "repeats": 3},
                                                    "summary": s}})  # fmt: skip
    assert "## kTLS (guest kernel 6.1.0-x under QEMU/TCG)" in sec
    assert "| ratio" in sec and "2.20x" in sec and "0.50x" in sec
    assert "| ztunnel pair, kTLS (--ktls on)" in sec and "0.50 " in sec


def test_no_mesh_missing_leaves_fractions_empty() -> None:
    s = K.summarize([cell("userspace", 20.0, 4.0, 2.0)])
    assert s["modes"]["userspace"]["bulk_fraction_of_nomesh"] is None
    assert s["ktls_over_userspace"]["bulk_mib_per_s"] is None


def test_skipped_guest_says_why() -> None:
    sec = report.ktls_guest_section(
        {"ktls_guest": {"status": "skipped", "reason": "QEMU cannot run here: not installed"}}
    )
    assert sec.splitlines()[0] == "## kTLS (guest kernel)"
    assert "Skipped: QEMU cannot run here: not installed" in sec
    assert report.ktls_guest_section({"modes": {}}) == ""


def test_modes_pass_their_ztunnel_flags_to_the_lab(tmp_path: Path) -> None:
    from ztunnel.main import build_parser

    assert M.MODES["ambient"].ztunnel_args == ("--ktls", "off")
    assert M.MODES["ambient-ktls"].ztunnel_args == ("--ktls", "on")
    assert M.MODES["nomesh"].ztunnel_args == ()
    roots = suite.Roots("kt", state_root=tmp_path)
    lab = roots.lab(M.MODES["ambient-ktls"], suite.Progress(lambda _m: None))
    assert lab.ztunnels.extra_args == ("--ktls", "on")
    # ztunnel itself takes them
    base = ["--node", "n1", "--config", "x.yaml", "--ca-dir", "ca"]
    for mode in ("ambient", "ambient-ktls"):
        args = build_parser().parse_args([*base, *M.MODES[mode].ztunnel_args])
        assert args.ktls == M.MODES[mode].ztunnel_args[1]


def test_bench_has_a_flag_to_leave_the_guest_out() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    suite.register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["bench", "--no-guest"]).no_guest is True
    assert parser.parse_args(["bench"]).no_guest is False


def test_guest_part_runs_only_for_the_ktls_mode(tmp_path: Path) -> None:
    import argparse

    def part(no_guest: bool, modes: list[str]) -> dict[str, Any]:
        args = argparse.Namespace(no_guest=no_guest, quick=True)
        return suite.guest_part(args, modes, tmp_path, lambda _m: None)

    assert part(True, list(M.MODES)) == {"status": "skipped", "reason": "--no-guest"}
    assert part(False, ["nomesh", "ambient"]) == {
        "status": "skipped",
        "reason": "ambient-ktls is not among --modes",
    }
