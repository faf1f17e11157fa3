"""The run's PNG plots (matplotlib, no display): throughput vs concurrency, latency percentiles, and
speed-up vs parallel degree, drawn from the series the cases recorded."""

from __future__ import annotations

from pathlib import Path

PLOTS = ("throughput_vs_concurrency.png", "latency_percentiles.png", "scaling.png")


def write_plots(out: Path, series: dict, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawers = (_throughput, _latency, _scaling)
    written = []
    for name, draw in zip(PLOTS, drawers):
        fig = draw(plt, series, title)
        fig.tight_layout(rect=(0, 0.08, 1, 1) if draw is _latency else None)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _throughput(plt, series: dict, title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.get("throughput", {}).items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Throughput vs concurrency ({title})")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _latency(plt, series: dict, title: str):
    runs = series.get("latency", {})
    metrics = (
        ("ttft", "time to first token", "s", 1),
        ("itl", "inter-token latency", "ms", 1e3),
        ("e2e", "request latency", "s", 1),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    width = 0.8 / max(1, len(runs))
    for ax, (key, name, unit, scale) in zip(axes, metrics):
        for i, (label, data) in enumerate(runs.items()):
            values = [float("nan") if data[key][p] is None else data[key][p] * scale for p in ("p50", "p90", "p99")]
            ax.bar([x + i * width for x in range(3)], values, width, label=label)
        ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_ylabel(unit)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8)
    fig.suptitle(f"Latency percentiles, client-side ({title}); no inter-token bars where the baseline does not stream")
    fig.subplots_adjust(bottom=0.2)
    return fig


def _scaling(plt, series: dict, title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    top = 2
    for label, points in series.get("scaling", {}).items():
        xs, ys = zip(*points)
        top = max(top, *xs)
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([1, top], [1, top], linestyle="--", color="gray", label="linear")
    ax.set_xticks(range(1, top + 1))
    ax.set_xlabel("degree (tp, pp or ep)")
    ax.set_ylabel("speed-up over degree 1 (same run)")
    ax.set_title(f"Scaling vs degree ({title})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
