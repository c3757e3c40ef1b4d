"""PNG plots of summarised results (:mod:`.statistics`). matplotlib (a ``dev`` extra) is imported
only when a plot is drawn."""

from __future__ import annotations

import numpy as np

from childtuning_trainer.experiments.statistics import method_order, regularizer_layout


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def regularizer_plot(
    tasks: dict, title: str, path: str, baselines: dict[str, float] | None = None
) -> None:
    """One panel per task: a group per regulariser, a point per mode (mean ± std over seeds).

    Points rather than bars, on an axis fitted to the data: the scores sit far from zero and the
    differences between cells are a point or two. A task's trivial predictor (``baselines``) is a
    dashed line.
    """
    plt = _pyplot()
    tables, regs, modes = regularizer_layout(tasks)
    names = sorted(tasks)
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.9 * len(regs) * len(names), 3.6))
    offset = 0.6 / max(len(modes), 1)
    for ax, task in zip(np.atleast_1d(axes), names, strict=True):
        table = tables[task]
        for i, m in enumerate(modes):
            means = [table.get(r, {}).get(m, {}).get("mean", np.nan) for r in regs]
            stds = [table.get(r, {}).get(m, {}).get("std", 0.0) for r in regs]
            xs = np.arange(len(regs)) + (i - (len(modes) - 1) / 2) * offset
            ax.errorbar(xs, means, yerr=stds, fmt="o", ms=4, capsize=2, label=m)
        if baselines and task in baselines:
            ax.axhline(baselines[task], color="gray", ls="--", lw=1, label="trivial predictor")
        ax.set_xticks(np.arange(len(regs)), [r.split(" (")[0] for r in regs], rotation=30)
        ax.set_title(task, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("dev score x 100 (mean ± std)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(plt, fig, path)


def bar_plot(tasks: dict, title: str, path: str) -> None:
    """Bars with error bars (± std over seeds): one group per task, one bar per method."""
    plt = _pyplot()
    methods = method_order(tasks)
    names = sorted(tasks)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names) * max(1, len(methods) / 3), 3.6))
    for i, m in enumerate(methods):
        means = [tasks[t].get(m, {}).get("mean", np.nan) for t in names]
        stds = [tasks[t].get(m, {}).get("std", 0.0) for t in names]
        xs = np.arange(len(names)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=m)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("dev score x 100 (mean ± std)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(methods), 3))
    _save(plt, fig, path)


def heat_map(rows: list[str], cols: list[str], values: np.ndarray, title: str, path: str) -> None:
    """``values`` (rows x cols) as colours with each finite value written in its cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(cols), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    _save(plt, fig, path)
