"""Markdown tables of summarised results (:mod:`.statistics`): a column per method, or per
regulariser a row and per mode a column (the layout of Xu et al., 2021, Table 3)."""

from __future__ import annotations

import numpy as np

from childtuning_trainer.experiments.statistics import (
    has_regularizers,
    method_order,
    paired_gains,
    regularizer_layout,
)


def cell(stats: dict | None, digits: int = 1, signed: bool = False) -> str:
    if stats is None:
        return "–"
    mean = f"{stats['mean']:{'+' if signed else ''}.{digits}f}"
    if stats["n"] == 1:
        return f"{mean} (1)"
    return f"{mean} ± {stats['std']:.{digits}f} ({stats['n']})"


def markdown_table(
    tasks: dict,
    metric_names: dict[str, str],
    baselines: dict[str, float] | None = None,
    digits: int = 1,
) -> list[str]:
    """Rows: tasks (and their average); columns: methods, then the trivial predictor's score
    (majority class or a constant, mean over seeds) when ``baselines`` are given."""
    methods = method_order(tasks)
    extra = ["trivial"] if baselines else []
    lines = ["| task (metric) | " + " | ".join(methods + extra) + " |"]
    lines.append("| --- |" + " ---: |" * (len(methods) + len(extra)))
    for task in sorted(tasks):
        row = [cell(tasks[task].get(m), digits) for m in methods]
        if baselines:
            row.append(f"{baselines[task]:.1f}" if task in baselines else "–")
        lines.append(f"| {task} ({metric_names.get(task, '?')}) | " + " | ".join(row) + " |")
    if len(tasks) > 1:
        avg = []
        for m in methods:
            means = [tasks[t][m]["mean"] for t in tasks if m in tasks[t]]
            avg.append(f"{np.mean(means):.{digits}f}" if len(means) == len(tasks) else "–")
        lines.append("| average | " + " | ".join(avg + [""] * len(extra)) + " |")
    return lines


def render_by_regularizer(
    tables: dict,
    regs: list[str],
    columns: dict[str, str],
    titles: dict[str, str],
    notes: dict[str, str],
    digits: int,
    signed: bool = False,
) -> list[str]:
    """``tables`` (``{task: {regulariser: {column: stats}}}``) as one table per task, rows the
    regularisers, ``columns`` (key: header) in order, each task's note under it; then the average
    over tasks of each cell's mean."""
    header = ["| regulariser | " + " | ".join(columns.values()) + " |"]
    header.append("| --- |" + " ---: |" * len(columns))
    lines: list[str] = []
    for task in sorted(tables):
        lines += [f"**{titles[task]}**", "", *header]
        for reg in regs:
            cells = [cell(tables[task].get(reg, {}).get(c), digits, signed) for c in columns]
            lines.append(f"| {reg} | " + " | ".join(cells) + " |")
        lines.append("")
        if task in notes:
            lines += [notes[task], ""]
    if len(tables) > 1:
        lines += [f"**average over {', '.join(sorted(tables))}**", "", *header]
        sign = "+" if signed else ""
        for reg in regs:
            cells = []
            for c in columns:
                means = [table.get(reg, {}).get(c, {}).get("mean") for table in tables.values()]
                cells.append("–" if None in means else f"{np.mean(means):{sign}.{digits}f}")
            lines.append(f"| {reg} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def regularizer_tables(
    tasks: dict,
    metric_names: dict[str, str],
    baselines: dict[str, float] | None = None,
    digits: int = 1,
) -> list[str]:
    """One table per task, rows the regularisers (``none`` first), columns the modes, and the
    trivial predictor's score under it when ``baselines`` are given; then the average over tasks
    of each cell's mean (the paper's Table 3 layout)."""
    tables, regs, modes = regularizer_layout(tasks)
    titles = {task: f"{task} ({metric_names.get(task, '?')})" for task in tasks}
    notes = {
        task: f"Trivial predictor (mean over seeds): {score:.1f}."
        for task, score in (baselines or {}).items()
        if task in tasks
    }
    return render_by_regularizer(tables, regs, {m: m for m in modes}, titles, notes, digits)


def child_tuning_gains(tasks: dict, digits: int = 1) -> list[str]:
    """Per task, what each mode adds to each regulariser alone: rows the regularisers, columns
    ``MODE − vanilla``, cells the mean ± std over seeds of the per-seed difference
    (:func:`~.statistics.paired_gains`); then the average over tasks of each cell's mean. The
    paper's orthogonality claim reads as positive cells in every row."""
    tables, regs, modes = regularizer_layout(tasks)
    others = [m for m in modes if m != "vanilla"]
    if "vanilla" not in modes or not others:
        return []
    gains = paired_gains(tables, others)
    columns = {m: f"{m} − vanilla" for m in others}
    titles = {task: task for task in gains}
    return render_by_regularizer(gains, regs, columns, titles, {}, digits, signed=True)


def training_loss_tables(losses: dict) -> list[str]:
    """The mean training loss of the last epoch, laid out as the score tables (runs whose record
    keeps the logged losses only)."""
    lines = ["## Training loss in the last epoch", ""]
    lines.append(
        "Mean over the last epoch's steps of the loss each step minimised (with R3F, the task "
        "loss plus its penalty; with Mixout, on the mixed weights), mean ± std over seeds."
    )
    lines.append("")
    for setting, tasks in sorted(losses.items()):
        lines += [f"**{setting}**", ""]
        if has_regularizers(tasks):
            lines += regularizer_tables(tasks, {t: "loss" for t in tasks}, digits=3)
        else:
            lines += markdown_table(tasks, {t: "loss" for t in tasks}, digits=3) + [""]
    return lines
