"""The suite's two plots (matplotlib, PNG): step time by mode and framework; mask-selection time
against the number of eligible parameters."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("vanilla", "F", "D")


def step_times(train_step: dict[str, Any], path: str, title: str) -> str | None:
    """Grouped bars: median train-step seconds per mode, one bar per framework and config
    (whiskers: min and max over the rounds)."""
    series = []
    for label, result in train_step.items():
        frameworks = sorted({name.split("/")[0] for name in result["times"]})
        for framework in frameworks:
            series.append((f"{framework} {label}", framework, result["times"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, framework, times) in enumerate(series):
        medians, lows, highs = [], [], []
        for mode in MODES:
            t = times[f"{framework}/{mode}"]
            medians.append(t["median_s"])
            lows.append(t["median_s"] - t["min_s"])
            highs.append(t["max_s"] - t["median_s"])
        xs = [m + (i - (len(series) - 1) / 2) * width for m in range(len(MODES))]
        bars = ax.bar(xs, medians, width, yerr=[lows, highs], capsize=3, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(MODES)), ["vanilla", "ChildTuning-F", "ChildTuning-D"])
    ax.set_ylabel("seconds per train step (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mask_selection(result: dict[str, Any], path: str, title: str) -> str | None:
    """Log-log: seconds to select the mask against eligible parameters, ours vs official."""
    points = sorted(
        list(result.get("main", {}).values()) + list(result.get("sweep", {}).values()),
        key=lambda r: r["eligible_params"],
    )
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["eligible_params"] / 1e6 for p in points]
    for key, label in (
        ("official", "official (np.append + np.percentile)"),
        ("ours", "ours (fisher_mask)"),
    ):
        ax.plot(xs, [p[key]["median_s"] for p in points], marker="o", label=label)
    for p, x in zip(points, xs, strict=True):
        ax.annotate(
            p["shape"],
            (x, p["ours"]["median_s"]),
            fontsize=6,
            xytext=(3, -9),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eligible parameters (millions)")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
