"""The run's PNG charts (matplotlib, no display needed): latency versus rate per mode, the
latency distribution at the reference rate, and the mesh's memory per pod per density."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import find_run


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok_modes(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {k: v for k, v in results.get("modes", {}).items() if v.get("status") == "ok"}


def latency_vs_rate(results: Mapping[str, Any], path: Path) -> Path:
    """One panel per (protocol, body): p50 (solid) and p99 (dashed) per target rate, one
    colour per mode. Target rates are categories ("max" last): at a fixed rate every mode
    carries the same load, which is what makes the latencies comparable."""
    plt = _plt()
    modes = _ok_modes(results)
    combos = sorted(
        {(str(r["protocol"]), int(r["body_size"])) for m in modes.values() for r in m["runs"]}
    )
    n = max(1, len(combos))
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 4.2), squeeze=False)
    for ax, (proto, body) in zip(axes[0], combos, strict=False):
        rates = sorted(
            {float(r["target_rate"]) for m in modes.values() for r in m["runs"]
             if r["protocol"] == proto and int(r["body_size"]) == body},
            key=lambda x: (x == 0, x),
        )  # fmt: skip
        pos = {rate: i for i, rate in enumerate(rates)}
        for i, (name, m) in enumerate(modes.items()):
            runs = [
                r
                for r in m["runs"]
                if r["protocol"] == proto and int(r["body_size"]) == body and r.get("completed")
            ]
            runs.sort(key=lambda r: pos[float(r["target_rate"])])
            if not runs:
                continue
            x = [pos[float(r["target_rate"])] for r in runs]
            color = f"C{i}"
            ax.plot(x, [r["latency_ms"]["p50"] for r in runs], "o-", color=color, label=name)
            ax.plot(x, [r["latency_ms"]["p99"] for r in runs], "s--", color=color, alpha=0.7)
        ax.set_xticks(range(len(rates)))
        ax.set_xticklabels(["max" if r == 0 else f"{r:g}" for r in rates])
        ax.set_title(f"{proto}, {body} B body\n(solid p50, dashed p99)", fontsize=10)
        ax.set_xlabel("target requests/s")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_distribution(results: Mapping[str, Any], rate: float, path: Path) -> Path:
    """Latency by percentile (x: 0 .. 99.9, spread as 1/(1-q) so the tail gets room) for the
    reference run of each mode: where the tails part is what the mesh costs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ticks = [0.0, 0.5, 0.9, 0.99, 0.999]
    for i, (name, m) in enumerate(_ok_modes(results).items()):
        run = find_run(m, protocol="http/1.1", body_size=0, rate=rate)
        samples = sorted(run.get("samples_ms", [])) if run else []
        if len(samples) < 2:
            continue
        n = len(samples)
        q = [k / n for k in range(n)]
        ax.plot([1 / (1 - x) for x in q], samples, color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xticks([1 / (1 - t) for t in ticks])
    ax.set_xticklabels([f"p{t * 100:g}" for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"latency distribution, HTTP/1.1 small body at {rate:g} req/s")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_per_pod(results: Mapping[str, Any], densities: Sequence[int], path: Path) -> Path:
    """Mesh PSS per pod (MiB), a bar per density, grouped by mode."""
    plt = _plt()
    modes = {k: v for k, v in _ok_modes(results).items() if v.get("memory")}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / max(1, len(densities))
    for j, d in enumerate(densities):
        xs, ys = [], []
        for i, m in enumerate(modes.values()):
            mem = m["memory"].get(str(d))
            if mem and mem.get("per_pod_pss_kib") is not None:
                xs.append(i + j * width)
                ys.append(mem["per_pod_pss_kib"] / 1024)
        bars = ax.bar(xs, ys, width, label=f"{d} pods/node")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([i + width * (len(densities) - 1) / 2 for i in range(len(modes))])
    ax.set_xticklabels(list(modes), fontsize=8)
    ax.set_ylabel("mesh PSS per pod (MiB)")
    ax.set_title("memory of the mesh's processes per application pod")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_all(
    results: Mapping[str, Any], out: Path, *, rate: float, densities: Sequence[int]
) -> list[Path]:
    return [
        latency_vs_rate(results, out / "latency_vs_rate.png"),
        latency_distribution(results, rate, out / "latency_distribution.png"),
        memory_per_pod(results, densities, out / "memory_per_pod.png"),
    ]
