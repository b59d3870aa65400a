"""The report is arithmetic over measured results: percentiles, overhead against the no-mesh
baseline, the ambient/sidecar ratios, and tables that show '-' where nothing was measured."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import report


def run(
    proto: str, body: int, rate: float, p50: float, p99: float, rps: float, cpu: float = 0.25
) -> dict[str, Any]:
    return {
        "protocol": proto,
        "body_size": body,
        "target_rate": rate,
        "achieved_rate": rps,
        "completed": int(rps * 2),
        "errors": 0,
        "latency_ms": {"p50": p50, "p90": p50 * 1.5, "p99": p99, "p99.9": p99 * 2},
        "cpu_per_1k_requests": cpu,
    }


def results() -> dict[str, Any]:
    return {
        "meta": {"started": "20250101-000000", "machine": "box", "quick": True},
        "modes": {
            "nomesh": {
                "status": "ok",
                "title": "no mesh",
                "runs": [run("http/1.1", 0, 1000.0, 0.5, 1.0, 1000), run("http/1.1", 0, 0, 0.6,
                                                                            2.0, 20000)],
            },
            "sidecar": {
                "status": "ok",
                "title": "sidecar (Envoy)",
                "runs": [run("http/1.1", 0, 1000.0, 1.2, 3.0, 1000, cpu=0.4),
                         run("http/1.1", 0, 0.0, 5.0, 9.0, 6000, cpu=0.2)],
                "cpu": {"per_1k_requests": 0.1},  # aggregate: never the headline
                "memory": {"2": {"pss_kib": 4096, "per_pod_pss_kib": 1024.0},
                           "20": {"pss_kib": 40960, "per_pod_pss_kib": 1024.0,
                                  "per_pod_rss_kib": 3072.0}},
                "startup": {"median_ms": 190.0, "what": "sidecar ready"},
            },
            "ambient": {
                "status": "ok",
                "title": "ambient L4 (ztunnel)",
                "runs": [run("http/1.1", 0, 1000.0, 0.8, 2.0, 1000, cpu=0.3),
                         run("http/1.1", 0, 0.0, 4.0, 8.0, 11000, cpu=0.05)],
                "cpu": {"per_1k_requests": 0.02},  # aggregate: never the headline
                "memory": {"2": {"pss_kib": 2048, "per_pod_pss_kib": 512.0},
                           "20": {"pss_kib": 5120, "per_pod_pss_kib": 128.0,
                                  "per_pod_rss_kib": 4096.0}},
                "startup": {"median_ms": 8.0, "what": "enrol"},
            },
            "waypoint": {"status": "skipped", "reason": "no HBONE in the waypoint yet"},
        },
    }  # fmt: skip


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 1001)]
    s = report.summary(values)
    assert s["p50"] == 500.0 and s["p90"] == 900.0 and s["p99"] == 990.0 and s["p99.9"] == 999.0
    assert report.percentile([3.0], 99.9) == 3.0
    assert math.isnan(report.percentile([], 50))
    with pytest.raises(ValueError, match="percentile 0"):
        report.percentile([1.0], 0)
    assert report.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_overhead_and_ratio_refuse_missing_baselines() -> None:
    assert report.overhead(3.0, 1.0) == (2.0, 3.0)
    assert report.overhead(3.0, None) is None
    assert report.overhead(math.nan, 1.0) is None
    assert report.ratio(1.0, 0.0) is None


def test_summary_table_rows_and_overheads() -> None:
    table = report.summary_table(results(), reference_rate=1000.0, densities=[2, 20])
    lines = table.splitlines()
    assert lines[0].startswith("| architecture") and "p99 overhead vs no mesh" in lines[0]
    assert len(lines) == 2 + 3  # header, rule, three modes that ran (waypoint skipped)
    nomesh, sidecar, ambient = lines[2], lines[3], lines[4]
    assert "baseline" in nomesh and "20,000" in nomesh
    assert "+2.00 ms (3.00x)" in sidecar and "0.400" in sidecar and "1.0 MiB" in sidecar
    assert "+1.00 ms (2.00x)" in ambient and "0.125 MiB" not in ambient
    assert "5.0 MiB" in ambient and "8.00" in ambient
    assert "PSS per pod (20/node)" in lines[0] and "(RSS per pod, 20/node)" in lines[0]
    assert "3.0 MiB" in sidecar and "4.0 MiB" in ambient  # RSS shown, labelled, beside PSS
    # CPU at the headline rate, not the all-runs aggregate
    assert ambient.split("|")[6].strip() == "0.300" and sidecar.split("|")[6].strip() == "0.400"
    # nothing measured -> "-", never 0
    res = results()
    res["modes"]["ambient"]["runs"].pop()  # no max-rate run
    ambient = report.summary_table(res, reference_rate=1000.0, densities=[2, 20]).splitlines()[4]
    assert ambient.split("|")[5].strip() == "-"


def test_ratios_ambient_over_sidecar() -> None:
    r = report.ratios(results(), reference_rate=1000.0, density=20)
    assert r["p99_overhead"] == pytest.approx(1.0 / 2.0)
    assert r["cpu_per_request"] == pytest.approx(0.3 / 0.4)
    assert r["memory_per_pod"] == pytest.approx(128.0 / 1024.0)
    res = results()
    res["modes"]["ambient"]["runs"][0]["latency_ms"]["p99"] = 0.9  # below no mesh: noise
    assert report.ratios(res, reference_rate=1000.0, density=20)["p99_overhead"] is None
    # CPU per request is taken at the asked rate, not pooled over the runs
    assert report.ratios(res, reference_rate=0.0, density=20)["cpu_per_request"] == pytest.approx(
        0.05 / 0.2
    )
    del res["modes"]["sidecar"]
    assert all(v is None for v in report.ratios(res, reference_rate=1000.0, density=20).values())


def test_render_has_every_section_and_skip_reasons() -> None:
    md = report.render(results(), reference_rate=1000.0, densities=[2, 20])
    row = next(x for x in md.splitlines() if x.startswith("| ambient / sidecar"))
    assert [c.strip() for c in row.split("|")[2:5]] == ["0.50x", "0.75x", "0.12x"]
    assert "## All latency runs" in md and "| nomesh | http/1.1 | 0 B" in md.replace("  ", " ")
    assert "no HBONE in the waypoint yet" in md
    assert "| max " in md.replace("  ", " ")


def test_render_records_commit_and_command() -> None:
    res = results()
    res["meta"]["host"] = {"commit": "0123abcd-dirty"}
    res["meta"]["command"] = "python3 -m meshctl bench --quick"
    md = report.render(res, reference_rate=1000.0, densities=[2, 20])
    assert "Commit `0123abcd-dirty`; command: `python3 -m meshctl bench --quick`" in md
    assert "Commit `not recorded`" in report.render(results(), reference_rate=1000.0, densities=[2])


def test_pod_ready_is_shown_as_a_distribution() -> None:
    samples = [float(v) for v in range(1, 11)]
    assert report.distribution(samples) == (
        "min 1.00 / median 5.50 / p90 9.00 / max 10.00 ms (n=10)"
    )
    assert report.distribution([]) == "-"
    res = results()
    res["modes"]["ambient"]["startup"]["samples_ms"] = samples
    assert "median 5.50" in report.other_table(res)


def test_markdown_pads_columns() -> None:
    t = report.markdown([["a", "bb"], ["ccc", "d"]])
    assert t.splitlines() == ["| a   | bb |", "|-----|----|", "| ccc | d  |"]


def test_repeats_merge_to_medians_with_spread_and_sums() -> None:
    a = [run("http/1.1", 0, 1000.0, 0.5, 2.0, 990, cpu=0.3), run("h2", 0, 0.0, 1.0, 4.0, 5000)]
    b = [run("http/1.1", 0, 1000.0, 0.7, 3.0, 1000, cpu=0.5), run("h2", 0, 0.0, 1.0, 4.0, 6000)]
    c = [run("http/1.1", 0, 1000.0, 0.6, 9.0, 1010, cpu=0.4)]  # one point missing: still merged
    a[0]["samples_ms"] = [0.5]
    merged = report.merge_repeats([a, b, c])
    assert [report.point(r) for r in merged] == [("http/1.1", 0, 1000.0), ("h2", 0, 0.0)]
    ref, h2 = merged
    assert ref["latency_ms"]["p99"] == 3.0 and ref["latency_ms"]["p50"] == 0.6
    assert ref["spread_ms"]["p99"] == pytest.approx(7.0)
    assert ref["n_repeats"] == 3 and len(ref["repeats"]) == 3
    assert ref["achieved_rate"] == 1000 and ref["completed"] == 2 * (990 + 1000 + 1010)
    assert ref["cpu_per_1k_requests"] == pytest.approx(0.4)
    assert ref["samples_ms"] == [0.5]
    assert h2["n_repeats"] == 2 and h2["achieved_rate"] == 5500
    single = report.merge_repeats([a])
    assert single[0]["spread_ms"] is None and single[0]["n_repeats"] == 1


def test_a_difference_inside_the_spread_is_noise() -> None:
    res = results()
    modes = res["modes"]
    for name, rounds in (
        ("nomesh", [[run("http/1.1", 0, 1000.0, 0.5, v, 1000)] for v in (1.0, 1.4, 1.2)]),
        ("sidecar", [[run("http/1.1", 0, 1000.0, 1.2, v, 1000)] for v in (3.0, 3.1, 2.9)]),
        ("ambient", [[run("http/1.1", 0, 1000.0, 0.8, v, 1000)] for v in (1.3, 1.5, 1.6)]),
    ):
        modes[name]["runs"] = report.merge_repeats(rounds)
    res["meta"]["repeats"] = 3
    # ambient's p99 1.5 vs no mesh 1.2: +0.3, inside no mesh's spread 0.4 -> noise, no ratio
    table = report.summary_table(res, reference_rate=1000.0, densities=[2, 20])
    ambient, sidecar = table.splitlines()[4], table.splitlines()[3]
    assert "(noise)" in ambient and "(noise)" not in sidecar
    assert "1.50 (spread 0.30)" in ambient
    assert report.ratios(res, reference_rate=1000.0, density=20)["p99_overhead"] is None
    md = report.render(res, reference_rate=1000.0, densities=[2, 20])
    assert "ran 3 times, interleaved" in md
    assert "ran ONCE" in report.render(results(), reference_rate=1000.0, densities=[2, 20])


def test_pod_ready_per_density_and_its_ratio_only_for_the_same_span() -> None:
    res = results()
    # old-style results (each mode its own span): no pod-ready ratio
    assert report.ratios(res, reference_rate=1000.0, density=20)["pod_ready"] is None
    for name, meds in (("sidecar", (300.0, 400.0)), ("ambient", (150.0, 100.0))):
        res["modes"][name]["startup_by_density"] = {
            d: {"what": f"{name} span", "samples_ms": [m - 10, m, m + 10], "median_ms": m}
            for d, m in zip(("2", "20"), meds, strict=True)
        }
    r = report.ratios(res, reference_rate=1000.0, density=20)
    assert r["pod_ready"] == pytest.approx(0.25)
    table = report.other_table(res)
    assert "2/node: min 290" in table and "20/node: min 390" in table
    res["modes"]["ambient"]["startup_by_density"]["20"].update(
        cni_add_ms=[100.0, 90.0, 110.0], first_answer_ms=[40.0, 60.0, 50.0]
    )
    table = report.other_table(res)
    assert "[CNI ADD median 100, first answer median 50.00]" in table
    md = report.render(res, reference_rate=1000.0, densities=[2, 20])
    row = next(x for x in md.splitlines() if x.startswith("| ambient / sidecar"))
    assert row.split("|")[5].strip() == "0.25x" and "pod ready, median (20/node)" in md
    assert "pod ready ms, median (20/node)" in md


def test_ratio_table_has_every_pair_that_ran_and_bulk_fractions() -> None:
    """ambient against both Envoy peers, our waypoint against Envoy's on the waypoint
    processes alone (the ztunnels under them are the same), and bulk against no mesh."""
    res = results()
    modes = res["modes"]
    modes["node-envoy"] = {
        **modes["sidecar"],
        "title": "node Envoy",
        "runs": [run("http/1.1", 0, 1000.0, 1.0, 2.5, 1000, cpu=0.6)],
        "memory": {"20": {"per_pod_pss_kib": 256.0}},
    }

    def wp_run(zt: float, wp: float) -> dict[str, Any]:
        r = run("http/1.1", 0, 1000.0, 2.0, 4.0, 1000, cpu=0.9)
        r["mesh_cpu_by_process_s"] = {"ztunnel/n1": zt, "waypoint/bench/waypoint": wp}
        return r  # completed 2000

    modes["waypoint"] = {
        "status": "ok",
        "title": "ours",
        "runs": [wp_run(1.0, 0.4)],
        "memory": {
            "20": {
                "by_process": {
                    "ztunnel/n1": {"pss_kib": 9000},
                    "waypoint/bench/waypoint": {"pss_kib": 3000},
                }
            }
        },
    }
    modes["envoy-waypoint"] = {
        "status": "ok",
        "title": "envoy",
        "runs": [wp_run(1.0, 0.8)],
        "memory": {
            "20": {
                "by_process": {
                    "ztunnel/n1": {"pss_kib": 9000},
                    "waypoint/bench/waypoint": {"pss_kib": 6000},
                }
            }
        },
    }
    for name, mib in (("nomesh", 200.0), ("ambient", 150.0), ("node-envoy", 100.0)):
        modes[name]["bulk"] = {"ok": True, "mib_per_s": mib}
    r = report.ratios(
        res,
        reference_rate=1000.0,
        density=20,
        ours="waypoint",
        peer="envoy-waypoint",
        only="waypoint/",
    )
    assert r["cpu_per_request"] == pytest.approx(0.5)  # 0.2 vs 0.4 s per 1k, ztunnels left out
    assert r["memory_per_pod"] == pytest.approx(0.5)
    table = report.ratio_table(res, reference_rate=1000.0, density=20)
    rows = {
        x.split("|")[1].strip(): [c.strip() for c in x.split("|")[2:-1]]
        for x in table.splitlines()[2:]
    }
    assert rows["ambient / sidecar"][:3] == ["0.50x", "0.75x", "0.12x"]
    assert rows["ambient / node-envoy"][:3] == ["0.67x", "0.50x", "0.50x"]
    wp = next(k for k in rows if k.startswith("waypoint / envoy-waypoint"))
    assert rows[wp][1:3] == ["0.50x", "0.50x"]
    md = report.render(res, reference_rate=1000.0, densities=[2, 20])
    assert "## Ratios" in md
    assert "Bulk (one stream) as a fraction of no mesh: ambient 0.75, node-envoy 0.50" in md
    modes["node-envoy"]["status"] = "failed"
    assert "node-envoy" not in report.ratio_table(res, reference_rate=1000.0, density=20)
