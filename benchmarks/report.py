"""Turning one benchmark run's measurements into the report: percentiles, overheads, ratios and
the markdown tables.

Pure functions over the run's JSON-shaped results (plain dicts, exactly what `results.json`
holds), so the report can be regenerated from a saved run and every cell is traceable to a
measured figure. A cell with nothing measured behind it says so ("-"), it never shows a zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
BASELINE = "nomesh"
Result = Mapping[str, Any]


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of unsorted values (the load generator's definition)."""
    if not values:
        return math.nan
    if not 0.0 < pct <= 100.0:
        raise ValueError(f"percentile {pct}: must be in (0, 100]")
    ordered = sorted(values)
    # rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, not 999
    rank = max(1, math.ceil(round(pct / 100.0 * len(ordered), 9)))
    return float(ordered[rank - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 and the median-free extremes of a sample list."""
    out = {f"p{p:g}": percentile(values, p) for p in PERCENTILES}
    out["min"] = float(min(values)) if values else math.nan
    out["max"] = float(max(values)) if values else math.nan
    return out


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0


def overhead(value: float | None, base: float | None) -> tuple[float, float] | None:
    """(added, ratio) of a figure against the no-mesh baseline; None if either is missing."""
    if value is None or base is None or math.isnan(value) or math.isnan(base) or base <= 0:
        return None
    return value - base, value / base


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


# -- repeats ---------------------------------------------------------------------------------

LAT_KEYS = ("p50", "p90", "p99", "p99.9")


def point(run: Result) -> tuple[str, int, float]:
    return (
        str(run.get("protocol")),
        int(run.get("body_size", -1)),
        float(run.get("target_rate", -1)),
    )


def merge_repeats(rounds: Sequence[Sequence[Result]]) -> list[dict[str, Any]]:
    """One entry per latency point from the same point's runs in every round: latency, rate and
    CPU per request are the medians over the repeats, `spread_ms` is max - min of each latency
    percentile across them (what one more repeat could move a figure by), and `repeats` keeps
    every repeat's own figures. Counts (requests, errors, CPU seconds) are summed. Samples for
    the distribution chart are the first repeat's."""
    order: list[tuple[str, int, float]] = []
    by: dict[tuple[str, int, float], list[Result]] = {}
    for rnd in rounds:
        for r in rnd:
            k = point(r)
            if k not in by:
                order.append(k)
                by[k] = []
            by[k].append(r)
    out: list[dict[str, Any]] = []
    for k in order:
        reps = by[k]
        merged = dict(reps[0])
        lats = {
            key: [float(r["latency_ms"][key]) for r in reps if key in r.get("latency_ms", {})]
            for key in LAT_KEYS
        }
        merged["latency_ms"] = {**dict(reps[0].get("latency_ms", {}))}
        merged["latency_ms"].update({key: median(v) for key, v in lats.items() if v})
        merged["n_repeats"] = len(reps)
        merged["spread_ms"] = (
            {key: max(v) - min(v) for key, v in lats.items() if v} if len(reps) > 1 else None
        )
        merged["achieved_rate"] = median([float(r.get("achieved_rate", 0)) for r in reps])
        merged["completed"] = sum(int(r.get("completed", 0)) for r in reps)
        merged["errors"] = sum(int(r.get("errors", 0)) for r in reps)
        if any("mesh_cpu_s" in r for r in reps):
            merged["mesh_cpu_s"] = round(sum(float(r.get("mesh_cpu_s", 0)) for r in reps), 3)
        per = [float(r["cpu_per_1k_requests"]) for r in reps if r.get("cpu_per_1k_requests")]
        merged["cpu_per_1k_requests"] = round(median(per), 4) if per else None
        merged["repeats"] = [
            {
                key: r.get(key)
                for key in (
                    "achieved_rate",
                    "completed",
                    "errors",
                    "latency_ms",
                    "mesh_cpu_s",
                    "cpu_per_1k_requests",
                    "mesh_cpu_by_process_s",
                )
                if key in r
            }
            for r in reps
        ]
        out.append(merged)
    return out


def spread(run: Result | None, key: str) -> float | None:
    """max - min of a latency percentile over the run's repeats; None for a single run."""
    if run is None:
        return None
    v = (run.get("spread_ms") or {}).get(key)
    return None if v is None else float(v)


def is_noise(a: Result | None, b: Result | None, key: str = "p99") -> bool:
    """Whether two points' difference at `key` is no larger than the larger of their spreads
    across repeats, i.e. one more repeat could reverse it. False when a spread is unknown."""
    va, vb, sa, sb = latency(a, key), latency(b, key), spread(a, key), spread(b, key)
    if va is None or vb is None or sa is None or sb is None:
        return False
    return abs(va - vb) <= max(sa, sb)


# -- picking figures out of a run ------------------------------------------------------------


def find_run(
    mode: Result, *, protocol: str, body_size: int, rate: float
) -> Mapping[str, Any] | None:
    for r in mode.get("runs", []):
        if (
            r.get("protocol") == protocol
            and int(r.get("body_size", -1)) == body_size
            and float(r.get("target_rate", -1)) == rate
        ):
            return dict(r)
    return None


def latency(run: Result | None, key: str) -> float | None:
    if run is None:
        return None
    v = run.get("latency_ms", {}).get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def max_rate(mode: Result, protocol: str = "http/1.1", body_size: int = 0) -> float | None:
    run = find_run(mode, protocol=protocol, body_size=body_size, rate=0.0)
    return float(run["achieved_rate"]) if run and run.get("completed") else None


def cpu_per_1k(mode: Result, rate: float) -> float | None:
    """Mesh CPU seconds per 1,000 requests at one rate (HTTP/1.1, small body). Never the
    aggregate over all runs: that is weighted toward the max-rate runs, where the faster mode
    completes more requests, and so compares the modes at different loads."""
    run = find_run(mode, protocol="http/1.1", body_size=0, rate=rate)
    v = run.get("cpu_per_1k_requests") if run else None
    return None if v is None else float(v)


def memory(mode: Result, pods_per_node: int) -> Mapping[str, Any] | None:
    m = (mode.get("memory") or {}).get(str(pods_per_node))
    return dict(m) if m else None


def startup_ms(mode: Result, pods_per_node: int | None = None) -> float | None:
    """Median pod ready (ms) at a density, or the first density measured when not given."""
    s = pod_ready(mode, pods_per_node) if pods_per_node is not None else None
    s = s or mode.get("startup") or {}
    v = s.get("median_ms")
    return None if v is None else float(v)


def pod_ready(mode: Result, pods_per_node: int) -> Result | None:
    """The pod-ready samples at one density (results before per-density ones: None)."""
    s = (mode.get("startup_by_density") or {}).get(str(pods_per_node))
    return dict(s) if s else None


# -- formatting ------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_over(o: tuple[float, float] | None) -> str:
    if o is None:
        return "-"
    added, r = o
    return f"{added:+.2f} ms ({r:.2f}x)"


def fmt_mib(kib: float | None) -> str:
    if kib is None:
        return "-"
    return f"{kib / 1024:.1f} MiB"


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first row is the header. Columns padded for plain text."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def summary_table(results: Result, *, reference_rate: float, densities: Iterable[int]) -> str:
    """One row per architecture: latency at the reference rate (HTTP/1.1, small body), its
    overhead over no mesh, the maximum rate, mesh CPU per 1,000 requests, mesh memory."""
    dens = list(densities)
    modes: Mapping[str, Result] = results.get("modes", {})
    base = modes.get(BASELINE)
    base_run = (
        find_run(base, protocol="http/1.1", body_size=0, rate=reference_rate) if base else None
    )
    header = [
        "architecture",
        f"p50 ms @{reference_rate:g} rps",
        "p99 ms (median)",
        "p99 overhead vs no mesh",
        "max rps",
        f"mesh CPU s / 1k req @{reference_rate:g} rps",
    ]
    header += [f"mesh PSS, {d} pods/node" for d in dens]
    header += [f"PSS per pod ({d}/node)" for d in dens[-1:]]
    header += [f"(RSS per pod, {d}/node)" for d in dens[-1:]]
    header += [f"pod ready ms, median ({d}/node)" for d in dens]
    rows = [header]
    for name, mode in modes.items():
        if mode.get("status") != "ok":
            continue
        run = find_run(mode, protocol="http/1.1", body_size=0, rate=reference_rate)
        p50, p99 = latency(run, "p50"), latency(run, "p99")
        sp = spread(run, "p99")
        row = [
            str(mode.get("title", name)),
            fmt_ms(p50),
            fmt_ms(p99) + ("" if sp is None else f" (spread {sp:.2f})"),
            "baseline"
            if name == BASELINE
            else fmt_over(overhead(p99, latency(base_run, "p99")))
            + (" (noise)" if is_noise(run, base_run) else ""),
            fmt_num(max_rate(mode)),
            "-" if name == BASELINE else fmt_num(cpu_per_1k(mode, reference_rate), 3),
        ]
        for d in dens:
            m = memory(mode, d)
            row.append("-" if name == BASELINE else fmt_mib(m.get("pss_kib") if m else None))
        for d in dens[-1:]:
            m = memory(mode, d)
            for key in ("per_pod_pss_kib", "per_pod_rss_kib"):
                row.append("-" if name == BASELINE else fmt_mib(m.get(key) if m else None))
        for d in dens:
            row.append("-" if name == BASELINE else fmt_ms(startup_ms(mode, d)))
        rows.append(row)
    return markdown(rows)


def detail_table(results: Result) -> str:
    """Every latency run of every mode: the figures behind the charts."""
    rows = [
        [
            "mode",
            "protocol",
            "body",
            "target rps",
            "achieved rps",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99 spread",
            "repeats",
            "errors",
            "mesh CPU s/1k",
        ]
    ]
    for name, mode in results.get("modes", {}).items():
        for r in mode.get("runs", []):
            rate = float(r.get("target_rate", 0))
            per1k = r.get("cpu_per_1k_requests")
            rows.append(
                [
                    name,
                    str(r.get("protocol")),
                    f"{int(r.get('body_size', 0))} B",
                    "max" if rate == 0 else f"{rate:g}",
                    fmt_num(r.get("achieved_rate")),
                    *(fmt_ms(latency(r, k)) for k in ("p50", "p90", "p99", "p99.9")),
                    fmt_ms(spread(r, "p99")),
                    str(r.get("n_repeats", 1)),
                    str(r.get("errors", 0)),
                    "-" if name == BASELINE or per1k is None else f"{float(per1k):.3f}",
                ]
            )
    return markdown(rows)


def distribution(samples: Sequence[float]) -> str:
    """min / median / p90 / max in ms and the count: a start-up figure is a distribution (the
    slow pods are the ones a rollout waits for), so a median alone hides the tail."""
    if not samples:
        return "-"
    return (
        f"min {fmt_ms(min(samples))} / median {fmt_ms(median(samples))} / p90"
        f" {fmt_ms(percentile(samples, 90))} / max {fmt_ms(max(samples))} ms (n={len(samples)})"
    )


def ready_parts(st: Result) -> str:
    """Which part ended an ambient pod's span: the CNI ADD's return or the first answer."""
    cni, first = st.get("cni_add_ms"), st.get("first_answer_ms")
    if not cni or not first:
        return ""
    return f" [CNI ADD median {fmt_ms(median(cni))}, first answer median {fmt_ms(median(first))}]"


def other_table(results: Result) -> str:
    """Bulk throughput, startup, and why any mode did not run."""
    rows = [["mode", "status", "bulk MiB/s", "pod ready", "note"]]
    for name, mode in results.get("modes", {}).items():
        bulk = mode.get("bulk") or {}
        by = mode.get("startup_by_density") or {}
        if not by and mode.get("startup"):
            by = {"?": mode["startup"]}
        ready = "; ".join(
            f"{d}/node: {distribution(st.get('samples_ms') or [])}{ready_parts(st)}"
            for d, st in by.items()
        )
        what = next((str(st.get("what")) for st in by.values() if st.get("what")), "")
        rows.append(
            [
                name,
                str(mode.get("status")),
                fmt_num(bulk.get("mib_per_s"), 1),
                f"{ready} ({what})" if ready else "-",
                str(mode.get("reason") or mode.get("description") or ""),
            ]
        )
    return markdown(rows)


# (ours, peer, process-label prefix the CPU and memory ratios are limited to, or "" for the
# whole mesh): a waypoint pair shares its ztunnels, so only the waypoints themselves differ
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("ambient", "sidecar", ""),
    ("ambient", "node-envoy", ""),
    ("waypoint", "envoy-waypoint", "waypoint/"),
)


def _by_process(run: Result | None, prefix: str) -> float | None:
    """CPU s per 1,000 requests of the processes labelled `prefix`*, median over repeats."""
    if run is None:
        return None
    per: list[float] = []
    for rep in run.get("repeats") or [run]:
        by = rep.get("mesh_cpu_by_process_s") or {}
        done = int(rep.get("completed") or 0)
        mine = [float(v) for k, v in by.items() if str(k).startswith(prefix)]
        if mine and done > 0:
            per.append(sum(mine) / done * 1000.0)
    return median(per) if per else None


def _pss_of(m: Result | None, prefix: str) -> float | None:
    if not m:
        return None
    by = m.get("by_process") or {}
    mine = [float(v.get("pss_kib", 0)) for k, v in by.items() if str(k).startswith(prefix)]
    return sum(mine) if mine else None


def ratios(
    results: Result,
    *,
    reference_rate: float,
    density: int,
    ours: str = "ambient",
    peer: str = "sidecar",
    only: str = "",
) -> dict[str, float | None]:
    """ours / peer for what the issue asks: p99 overhead, CPU per request, memory (PSS per
    pod, or with `only` the PSS of the processes so labelled), pod ready. With `only`, CPU
    per request is that of those processes alone."""
    modes = results.get("modes", {})
    amb, side, base = modes.get(ours), modes.get(peer), modes.get(BASELINE)
    if (amb or {}).get("status", "ok") != "ok" or (side or {}).get("status", "ok") != "ok":
        amb = side = None
    out: dict[str, float | None] = {
        "p99_overhead": None,
        "cpu_per_request": None,
        "memory_per_pod": None,
        "pod_ready": None,
    }
    if not amb or not side:
        return out

    def p99(m: Result | None) -> float | None:
        if not m:
            return None
        return latency(find_run(m, protocol="http/1.1", body_size=0, rate=reference_rate), "p99")

    def ref(m: Result | None) -> Result | None:
        return find_run(m, protocol="http/1.1", body_size=0, rate=reference_rate) if m else None

    oa, os_ = overhead(p99(amb), p99(base)), overhead(p99(side), p99(base))
    noise = is_noise(ref(amb), ref(base)) or is_noise(ref(side), ref(base))
    # a ratio of overheads means something only when both are above the baseline's p99 by more
    # than the spread across repeats
    if oa is not None and os_ is not None and oa[0] > 0 and os_[0] > 0 and not noise:
        out["p99_overhead"] = oa[0] / os_[0]
    ma, ms = memory(amb, density), memory(side, density)
    if only:
        out["cpu_per_request"] = ratio(_by_process(ref(amb), only), _by_process(ref(side), only))
        out["memory_per_pod"] = ratio(_pss_of(ma, only), _pss_of(ms, only))
    else:
        out["cpu_per_request"] = ratio(
            cpu_per_1k(amb, reference_rate), cpu_per_1k(side, reference_rate)
        )
        # PSS: shared pages (the Envoy binary, the interpreter) charged once across processes
        out["memory_per_pod"] = ratio(
            ma.get("per_pod_pss_kib") if ma else None, ms.get("per_pod_pss_kib") if ms else None
        )
    # only when both modes timed the same span (results with per-density pod ready)
    if pod_ready(amb, density) and pod_ready(side, density):
        out["pod_ready"] = ratio(startup_ms(amb, density), startup_ms(side, density))
    return out


def ratio_table(results: Result, *, reference_rate: float, density: int) -> str:
    """Every pair of PAIRS that both ran: ours / peer, below 1 where ours costs less."""
    rows = [
        [
            "ours / peer",
            f"p99 overhead @{reference_rate:g} rps",
            f"CPU per request @{reference_rate:g} rps",
            f"memory (PSS) per pod, {density}/node",
            f"pod ready, median ({density}/node)",
        ]
    ]
    modes = results.get("modes", {})
    for ours, peer, only in PAIRS:
        if not all((modes.get(m) or {}).get("status") == "ok" for m in (ours, peer)):
            continue
        r = ratios(results, reference_rate=reference_rate, density=density, ours=ours,
                   peer=peer, only=only)  # fmt: skip
        cells = [("-" if v is None else f"{v:.2f}x") for v in r.values()]
        label = f"{ours} / {peer}"
        if only:
            label += " (CPU and PSS: the waypoint processes only, not per pod)"
        rows.append([label, *cells])
    return markdown(rows) if len(rows) > 1 else ""


def bulk_fractions(results: Result) -> str:
    """Each mode's bulk throughput as a fraction of no mesh's, in one line."""
    modes = results.get("modes", {})
    base = float(((modes.get(BASELINE) or {}).get("bulk") or {}).get("mib_per_s") or 0)
    if base <= 0:
        return ""
    cells = []
    for name, m in modes.items():
        b = m.get("bulk") or {}
        if name != BASELINE and m.get("status") == "ok" and b.get("ok"):
            cells.append(f"{name} {float(b['mib_per_s']) / base:.2f}")
    return ("Bulk (one stream) as a fraction of no mesh: " + ", ".join(cells)) if cells else ""


SAME_NODE = ("nomesh-samenode", "ambient-samenode-hbone", "ambient-samenode", "ambient-sockmap")
# (ours, before, what the ratio says) for the same-node table
SAME_NODE_RATIOS = (
    ("ambient-samenode", "ambient-samenode-hbone", "local delivery / HBONE to itself"),
    ("ambient-sockmap", "ambient-samenode", "sockmap / user-space splice"),
    ("ambient-sockmap", "ambient-samenode-hbone", "local delivery + sockmap / HBONE to itself"),
)


def same_node_section(results: Result, *, reference_rate: float) -> str:
    """The same-node modes side by side (client and server pods on one node), with their own
    no-mesh baseline (the main table's is cross-node), and the ratios that say what local
    delivery and the sockmap each buy: latency and mesh CPU per request at the reference rate,
    one-stream bulk."""
    modes = results.get("modes", {})
    ran = [n for n in SAME_NODE if (modes.get(n) or {}).get("status") == "ok"]
    if not ran:
        return ""

    def figures(m: Result) -> dict[str, float | None]:
        run = find_run(m, protocol="http/1.1", body_size=0, rate=reference_rate)
        b = m.get("bulk") or {}
        return {
            "p50": latency(run, "p50"),
            "p99": latency(run, "p99"),
            "p99_spread": spread(run, "p99"),
            "cpu": cpu_per_1k(m, reference_rate),
            "max": max_rate(m),
            "bulk": float(b["mib_per_s"]) if b.get("ok") else None,
        }

    f = {n: figures(modes[n]) for n in ran}
    base = f.get(SAME_NODE[0], {}).get("bulk")
    rows = [["mode", f"p50 ms @{reference_rate:g}/s", "p99 ms (spread)", "mesh CPU s / 1k req",
             "max req/s", "bulk MiB/s", "bulk / same-node no mesh"]]  # fmt: skip
    for n in ran:
        v = f[n]
        frac = ratio(v["bulk"], base) if base else None
        rows.append([
            str(modes[n].get("title", n)), fmt_ms(v["p50"]),
            fmt_ms(v["p99"]) + ("" if v["p99_spread"] is None else f" ({v['p99_spread']:.2f})"),
            fmt_num(v["cpu"], 3), fmt_num(v["max"]), fmt_num(v["bulk"], 1),
            "-" if frac is None else f"{frac:.2f}",
        ])  # fmt: skip
    out = ["## Same node", "", "Client and server pods on node 1 (node 1 holds one pod more than"
           " in the other modes). Figures from this run; ratios below 1x mean ours is lower"
           " (for bulk and max req/s, higher is better); a p99 ratio whose difference is inside"
           " the spread across repeats is marked (noise).", "", markdown(rows)]  # fmt: skip
    rrows = [["ratio", "p50", "p99", "mesh CPU per request", "max req/s", "bulk MiB/s"]]
    for ours, before, label in SAME_NODE_RATIOS:
        if ours in f and before in f:
            a, b = f[ours], f[before]
            cells = [("-" if c is None else f"{c:.2f}x") for c in
                     (ratio(a[k], b[k]) for k in ("p50", "p99", "cpu", "max", "bulk"))]  # fmt: skip
            ref_a, ref_b = (find_run(modes[n], protocol="http/1.1", body_size=0,
                                     rate=reference_rate) for n in (ours, before))  # fmt: skip
            if cells[1] != "-" and is_noise(ref_a, ref_b):
                cells[1] += " (noise)"
            rrows.append([label, *cells])
    if len(rrows) > 1:
        out += ["", markdown(rrows)]
    return "\n".join(out)


def repeats_note(results: Result) -> str:
    n = int(results.get("meta", {}).get("repeats", 1))
    if n <= 1:
        return (
            "Each latency point ran ONCE (single repeat, e.g. --quick): there is no spread, so a"
            " difference between modes may be noise; rerun without --quick before drawing"
            " conclusions."
        )
    return (
        f"Each latency point ran {n} times, interleaved across modes (every mode once, then"
        " every mode again, ...): figures are the medians over the repeats, 'spread' is max -"
        " min across them, and an overhead no larger than the spread is marked (noise)."
    )


def ktls_guest_section(results: Result) -> str:
    """`meshctl bench`'s guest part (benchmarks.ktls_guest): no mesh, user-space TLS and kTLS
    in one boot of a kernel that has kTLS, with the ratios kTLS / user space. A guest part that
    did not run says why in one line, under the same heading."""
    g = results.get("ktls_guest")
    if not g:
        return ""
    kernel = g.get("kernel")
    head = f"## kTLS (guest kernel {kernel} under QEMU/TCG)" if kernel else "## kTLS (guest kernel)"
    if g.get("status") != "ok":
        return "\n".join([head, "", f"{str(g.get('status', 'failed')).capitalize()}: "
                          f"{g.get('reason', 'no reason recorded')}"])  # fmt: skip
    summ = g.get("summary") or {}
    modes = summ.get("modes") or {}
    pre = g.get("preset") or {}
    rate = pre.get("rate")
    rows = [["mode", "bulk MiB/s", "of no mesh", "mesh CPU s/GiB", f"p50 ms @{rate:g}/s"
             if isinstance(rate, (int, float)) else "p50 ms", "p99 ms", "achieved rps",
             "mesh CPU ms / req", "all CPU ms / req"]]  # fmt: skip
    for m in modes.values():
        frac = m.get("bulk_fraction_of_nomesh")
        rows.append([
            str(m.get("title", "?")),
            fmt_num(m.get("bulk_mib_per_s"), 1),
            "-" if frac is None else f"{frac:.2f}",
            fmt_num(m.get("bulk_mesh_cpu_s_per_gib"), 2),
            fmt_ms(m.get("p50_ms")),
            fmt_ms(m.get("p99_ms")),
            fmt_num(m.get("achieved_rate"), 1),
            fmt_num(m.get("mesh_cpu_ms_per_request"), 3),
            fmt_num(m.get("all_cpu_ms_per_request"), 3),
        ])  # fmt: skip
    r = summ.get("ktls_over_userspace") or {}

    def x(key: str) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.2f}x"

    ratio_rows = [
        ["kTLS / user-space TLS", "bulk MiB/s", "mesh CPU per GiB", "p50", "p99",
         "mesh CPU per request"],
        ["ratio", x("bulk_mib_per_s"), x("bulk_mesh_cpu_s_per_gib"), x("p50_ms"), x("p99_ms"),
         x("mesh_cpu_ms_per_request")],
    ]  # fmt: skip
    n = pre.get("repeats", "?")
    lines = [
        head,
        "",
        f"One boot of the guest kernel ({g.get('cpus', '?')} vCPUs, emulated: everything runs"
        " tens of times slower than on the host, so compare only within this table). The rig is"
        f" {g.get('rig', 'not recorded')}: ztunnel's own outbound, HBONE and inbound code for"
        " two nodes, forked into one process of its own (its CPU is 'mesh CPU'), on loopback,"
        " with no BPF capture; the load generator, echo server and bulk sink run in the"
        f" parent ('all CPU' adds theirs). Each mode ran {n} times, interleaved; medians. Bulk:"
        f" one stream of {pre.get('bulk_mib', '?')} MiB. Latency: open-loop HTTP/1.1 over"
        f" {pre.get('connections', '?')} connections for {pre.get('duration', '?')} s. The"
        " kTLS rows are checked: every HBONE connection was offloaded to the kernel (and none"
        " in the user-space rows).",
        "",
        markdown(rows),
        "",
        markdown(ratio_rows),
    ]
    split = [
        f"{m.get('title', '?')}: bulk {fmt_num(m.get('bulk_mesh_sys_s_per_gib'), 2)} of"
        f" {fmt_num(m.get('bulk_mesh_cpu_s_per_gib'), 2)} s/GiB, requests"
        f" {fmt_num(m.get('mesh_sys_ms_per_request'), 3)} of"
        f" {fmt_num(m.get('mesh_cpu_ms_per_request'), 3)} ms"
        for m in modes.values()
        if m.get("bulk_mesh_sys_s_per_gib") is not None
    ]
    if split:
        lines += ["", "Mesh CPU in the kernel (system time; kTLS's crypto is there, user-space"
                  f" TLS's is not): {'; '.join(split)}."]  # fmt: skip
    negotiated = [f"{m.get('title', '?')}: {', '.join(m['hbone_ciphers'])}"
                  for m in modes.values() if m.get("hbone_ciphers")]  # fmt: skip
    if negotiated:
        lines += ["", "HBONE cipher as each mode negotiated it (ztunnel's own choice, not"
                  f" forced): {'; '.join(negotiated)}."]  # fmt: skip
    raw = summ.get("raw") or {}
    if raw:
        figs = ", ".join(
            f"{name} {fmt_num(v.get('mib_per_s'), 1)} MiB/s ({fmt_num(v.get('cpu_s_per_gib'), 2)}"
            " CPU s/GiB"
            + (f", {v['fraction_of_plaintext']:.2f} of plaintext" if "fraction_of_plaintext" in v
               else "")
            + ")"
            for name, v in raw.items()
        )  # fmt: skip
        lines += [
            "",
            f"The record layer alone (raw loopback sockets, no ztunnel, both ends in one"
            f" process, {pre.get('bulk_mib', '?')} MiB, TLS_AES_256_GCM_SHA384 for both): {figs};"
            f" kTLS / user space: throughput {x('raw_mib_per_s')}, CPU per GiB"
            f" {x('raw_cpu_s_per_gib')}. A TLS path's fraction of plaintext here bounds the"
            " ztunnel rows' fraction of no mesh in this guest (the pair adds its own work on"
            " top of the record layer).",
        ]
    if g.get("ktls_ciphers"):
        lines += ["", f"Ciphers the guest kernel offloads: {', '.join(g['ktls_ciphers'])}."]
    if "cpu_crypto_flags" in g or "kernel_gcm_aes_driver" in g:
        lines += [
            "",
            "The emulated CPU's crypto flags: "
            f"{', '.join(g.get('cpu_crypto_flags') or []) or 'none'}; the guest kernel's"
            f" gcm(aes): {g.get('kernel_gcm_aes_driver', 'not listed')}.",
        ]
    if g.get("reason"):
        lines += ["", f"Some repeats failed: {g['reason']}"]
    return "\n".join(lines)


def render(results: Result, *, reference_rate: float, densities: Sequence[int]) -> str:
    """The whole markdown report."""
    meta = results.get("meta", {})
    parts = [
        "# ambientmesh benchmark",
        "",
        f"Run {meta.get('started', '?')} on {meta.get('machine', '?')}"
        f" ({'quick' if meta.get('quick') else 'full'} preset). Every figure below was measured"
        " in this run.",
        "",
        f"Commit `{meta.get('host', {}).get('commit', 'not recorded')}`; command:"
        f" `{meta.get('command', 'not recorded')}`",
        "",
        f"Latency: open-loop HTTP/1.1 keep-alive, small body, {reference_rate:g} req/s from a"
        " client pod on node 1 to a server pod on node 2, milliseconds (coordinated-omission"
        " corrected). Mesh CPU and memory count only the mesh's processes (ztunnels, Envoys,"
        " waypoints). Memory is PSS (/proc/<pid>/smaps_rollup: a page shared by N processes"
        " counts 1/N to each, so a binary shared by every sidecar is counted once); RSS, which"
        " counts it once per process, is shown in brackets for comparison only.",
        "",
        repeats_note(results),
        "",
        summary_table(results, reference_rate=reference_rate, densities=densities),
        "",
        "Pod ready is the same span in every mode: from the pod's network being ready (the"
        " bridge's CNI ADD returned) to its first request answered through the mesh, timed by a"
        " prober started in the pod beforehand (its netns and cgroup, so ambient capture applies"
        " to it) on the system-wide monotonic clock. Ambient: the real ambientmesh-cni ADD, its"
        " own interpreter start included, then ztunnel. Sidecar: the capture rules"
        " (iptables-restore) and the Envoy ELF's start (nsenter, no Python), then Envoy."
        " Node Envoy: the capture attached to the pod's cgroup and its listeners pushed to the"
        " node's running Envoy (no process starts: ambient's span carries its CNI plugin's"
        " start, node Envoy's does not, which favours node Envoy). The"
        " timed pods start one at a time, on node 1, into a lab already running the others;"
        " 'Other measures' gives min/median/p90/max at each density.",
        "",
    ]
    table = ratio_table(results, reference_rate=reference_rate, density=max(densities))
    if table:
        parts += [
            "## Ratios",
            "",
            table,
            "",
            "Below 1x: ours costs less. p99 overhead is '-' when either mesh's p99 is not above"
            " no mesh's by more than the spread across repeats (the difference is inside the"
            " noise), or no mesh did not run.",
            "",
        ]
    same = same_node_section(results, reference_rate=reference_rate)
    if same:
        parts += [same, ""]
    bulk = bulk_fractions(results)
    if bulk:
        parts += [bulk, ""]
    guest = ktls_guest_section(results)
    if guest:
        parts += [guest, ""]
    parts += ["## All latency runs", "", detail_table(results), "", "## Other measures", ""]
    parts += [other_table(results), ""]
    return "\n".join(parts)
