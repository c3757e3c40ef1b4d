"""Tables, JSON and plots of a protocol's accumulated results.

``experiments/<name>/protocol.json`` lists the protocol's runs (written when its sweep starts);
:func:`write_report` reads the finished ones from ``experiments/runs/`` (and the probes from
``experiments/probes/``) and writes ``report.md``, ``summary.json`` and PNG plots beside it.
Scores are the dev metric after the last epoch, x 100, as mean ± sample standard deviation over
seeds, with the per-seed values in the JSON.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from childtuning_trainer.experiments import store
from childtuning_trainer.experiments.protocols import Protocol, method_label
from childtuning_trainer.experiments.store import RunSpec
from childtuning_trainer.tasks import get_task

REPORTS_DIR = "experiments"
PROBES_DIR = os.path.join("experiments", "probes")


def protocol_path(name: str, reports_dir: str = REPORTS_DIR) -> str:
    return os.path.join(reports_dir, name, "protocol.json")


def save_protocol(protocol: Protocol, reports_dir: str = REPORTS_DIR) -> None:
    """Records which runs (and probes) make up ``protocol``, for :func:`write_report`."""
    os.makedirs(os.path.join(reports_dir, protocol.name), exist_ok=True)
    record = {
        "name": protocol.name,
        "kind": protocol.kind,
        "settings": protocol.settings,
        "runs": [dict(spec.overrides) for spec in protocol.specs],
        "probes": [[dict(spec.overrides), target] for spec, target in protocol.probes],
    }
    with open(protocol_path(protocol.name, reports_dir), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def load_protocol(name: str, reports_dir: str = REPORTS_DIR) -> Protocol:
    path = protocol_path(name, reports_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No protocol {name!r}: {path} does not exist (run sweep.py first)."
        )
    with open(path) as f:
        record = json.load(f)
    specs = tuple(RunSpec.of(**o) for o in record["runs"])
    probes = tuple((RunSpec.of(**o), target) for o, target in record["probes"])
    return Protocol(record["name"], record["kind"], specs, probes, record["settings"])


def score(record: dict) -> tuple[str, float]:
    """The run's main metric (the task's first) after the last epoch, x 100."""
    metric = record["best"]["metric"]
    return metric, 100.0 * record["eval"][metric]


def setting_of(overrides: dict) -> str:
    """The swept hyperparameters of a run other than seed, task and method, as text."""
    parts = []
    if "learning_rate" in overrides:
        parts.append(f"lr {overrides['learning_rate']:g}")
    if overrides.get("reserve_p") is not None:
        parts.append(f"p {overrides['reserve_p']:g}")
    return ", ".join(parts) or "config defaults"


def mean_std(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def cell(stats: dict | None, digits: int = 1, signed: bool = False) -> str:
    if stats is None:
        return "–"
    mean = f"{stats['mean']:{'+' if signed else ''}.{digits}f}"
    if stats["n"] == 1:
        return f"{mean} (1)"
    return f"{mean} ± {stats['std']:.{digits}f} ({stats['n']})"


def summarize(
    records: list[dict], value: Callable[[dict], float | None] = lambda r: score(r)[1]
) -> dict:
    """``{setting: {task: {method: stats + per-seed values}}}`` over seeds of ``value`` (default:
    the score); records whose value is ``None`` are left out."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        o = r["overrides"]
        if (v := value(r)) is not None:
            groups[setting_of(o)][o["task"]][method_label(o)][o.get("seed", 42)] = v
    out: dict = {}
    for setting, tasks in groups.items():
        for task, methods in tasks.items():
            for method, seeds in methods.items():
                stats = {**mean_std(list(seeds.values())), "seeds": seeds}
                out.setdefault(setting, {}).setdefault(task, {})[method] = stats
    return out


def best_settings(summary: dict) -> dict:
    """``{task: {method: (setting, stats)}}``: each method's setting with the highest mean, among
    its settings with the most seeds finished (a partly run setting is not compared with a full
    one)."""
    best: dict = {}
    for setting, tasks in summary.items():
        for task, methods in tasks.items():
            for method, stats in methods.items():
                current = best.setdefault(task, {}).get(method)
                rank = (stats["n"], stats["mean"])
                if current is None or rank > (current[1]["n"], current[1]["mean"]):
                    best[task][method] = (setting, stats)
    return best


def _methods(tables: dict) -> list[str]:
    order = ["pretrained", "vanilla", "F", "D", "D pruned", "D random", "D lowest-Fisher"]
    found = {m for methods in tables.values() for m in methods}
    return [m for m in order if m in found] + sorted(found - set(order))


def markdown_table(
    tasks: dict,
    metric_names: dict[str, str],
    baselines: dict[str, float] | None = None,
    digits: int = 1,
) -> list[str]:
    """Rows: tasks (and their average); columns: methods, then the trivial predictor's score
    (majority class or a constant, mean over seeds) when ``baselines`` are given."""
    methods = _methods(tasks)
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


MODE_ORDER = ("vanilla", "F", "D")


def by_regularizer(methods: dict) -> dict[str, dict[str, dict]]:
    """``{regulariser: {mode: stats}}`` from method labels ``MODE`` / ``MODE + REGULARISER``."""
    table: dict = defaultdict(dict)
    for label, stats in methods.items():
        mode, _, regularizer = label.partition(" + ")
        table[regularizer or "none"][mode] = stats
    return dict(table)


def _regularizer_tables(tasks: dict) -> tuple[dict, list[str], list[str]]:
    """``({task: by_regularizer(...)}, regularisers with none first, modes in MODE_ORDER)``."""
    tables = {task: by_regularizer(methods) for task, methods in tasks.items()}
    regs = {r for table in tables.values() for r in table}
    modes = {m for table in tables.values() for row in table.values() for m in row}
    ordered_modes = [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))
    return tables, sorted(regs, key=lambda r: (r != "none", r)), ordered_modes


def has_regularizers(tasks: dict) -> bool:
    """True when some method combines a regulariser with a mode: a row per regulariser then
    reads better than a column per combination."""
    return any(" + " in m for methods in tasks.values() for m in methods)


def _render_by_regularizer(
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
    tables, regs, modes = _regularizer_tables(tasks)
    titles = {task: f"{task} ({metric_names.get(task, '?')})" for task in tasks}
    notes = {
        task: f"Trivial predictor (mean over seeds): {score:.1f}."
        for task, score in (baselines or {}).items()
        if task in tasks
    }
    return _render_by_regularizer(tables, regs, {m: m for m in modes}, titles, notes, digits)


def child_tuning_gains(tasks: dict, digits: int = 1) -> list[str]:
    """Per task, what each mode adds to each regulariser alone: rows the regularisers, columns
    ``MODE − vanilla``, cells the mean ± std over seeds of the per-seed difference (a seed fixes the
    training subset and the classifier's initialisation, so the two runs of a seed pair up); then
    the average over tasks of each cell's mean. The paper's orthogonality claim reads as positive
    cells in every row."""
    tables, regs, modes = _regularizer_tables(tasks)
    others = [m for m in modes if m != "vanilla"]
    if "vanilla" not in modes or not others:
        return []
    gains: dict = {}
    for task, table in tables.items():
        for reg, row in table.items():
            base = row.get("vanilla", {}).get("seeds", {})
            for m in others:
                seeds = row.get(m, {}).get("seeds", {})
                paired = [seeds[s] - base[s] for s in sorted(seeds) if s in base]
                if paired:
                    gains.setdefault(task, {}).setdefault(reg, {})[m] = mean_std(paired)
    columns = {m: f"{m} − vanilla" for m in others}
    titles = {task: task for task in gains}
    return _render_by_regularizer(gains, regs, columns, titles, {}, digits, signed=True)


def regularizer_plot(
    tasks: dict, title: str, path: str, baselines: dict[str, float] | None = None
) -> None:
    """One panel per task: a group per regulariser, a point per mode (mean ± std over seeds).

    Points rather than bars, on an axis fitted to the data: the scores sit far from zero and the
    differences between cells are a point or two. A task's trivial predictor (``baselines``) is a
    dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables, regs, modes = _regularizer_tables(tasks)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_plot(tasks: dict, title: str, path: str) -> None:
    """Bars with error bars (± std over seeds): one group per task, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _methods(tasks)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heat_map(rows: list[str], cols: list[str], values: np.ndarray, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(cols), 1.2 + 0.5 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _header(protocol: Protocol, records: list[dict]) -> list[str]:
    seeds = sorted({r["overrides"].get("seed", 42) for r in records})
    lines = [f"# {protocol.name} ({protocol.kind})", ""]
    lines.append(f"{len(records)} of {len(protocol.specs)} runs finished; seeds {seeds}.")
    if records:
        lines.append(f"A run's command, e.g.: `{records[0]['command']}`")
    settings = {k: v for k, v in protocol.settings.items()}
    if settings:
        lines.append(f"Protocol settings: `{json.dumps(settings)}`.")
    return lines + [""]


def trivial_scores(records: list[dict]) -> dict[str, float]:
    """``{task: score}``: the trivial predictor's dev score x 100, averaged over seeds.

    Each seed draws its own training subset, so the majority class (or the training mean) and its
    score can differ from seed to seed; the mean is over every seed with a finished run of the task.
    """
    per_seed: dict = defaultdict(dict)
    for r in records:
        if "baseline" in r:
            o = r["overrides"]
            per_seed[o["task"]][o.get("seed", 42)] = 100 * r["baseline"]["eval"][score(r)[0]]
    return {task: float(np.mean(list(seeds.values()))) for task, seeds in per_seed.items()}


def _table_report(protocol: Protocol, records: list[dict], out_dir: str) -> tuple[list, dict]:
    summary = summarize(records)
    metric_names = {r["overrides"]["task"]: score(r)[0] for r in records}
    baselines = trivial_scores(records)
    lines = []
    for i, (setting, tasks) in enumerate(sorted(summary.items())):
        lines += [f"## Shared setting: {setting}", ""]
        png = f"bars_{i}.png"
        title = f"{protocol.name}: {setting}"
        if has_regularizers(tasks):
            lines += regularizer_tables(tasks, metric_names, baselines)
            regularizer_plot(tasks, title, os.path.join(out_dir, png), baselines)
            lines += [f"![{setting}]({png})", ""]
            if gains := child_tuning_gains(tasks):
                lines += [f"### What Child-Tuning adds to each regulariser ({setting})", ""]
                lines += [
                    "Each cell: the mean ± std over seeds of a mode's score minus vanilla's with "
                    "the same regulariser and seed (score x 100).",
                    "",
                    *gains,
                ]
        else:
            lines += markdown_table(tasks, metric_names, baselines) + [""]
            bar_plot(tasks, title, os.path.join(out_dir, png))
            lines += [f"![{setting}]({png})", ""]
    best = best_settings(summary)
    if len(summary) > 1:
        lines += ["## Each method at its own best setting (chosen on dev, as the paper did)", ""]
        tasks = {t: {m: stats for m, (_, stats) in ms.items()} for t, ms in best.items()}
        lines += markdown_table(tasks, metric_names) + [""]
        for task, methods in sorted(best.items()):
            chosen = "; ".join(f"{m}: {s}" for m, (s, _) in sorted(methods.items()))
            lines.append(f"- {task}: {chosen}")
        lines.append("")
    losses = summarize(records, store.last_epoch_train_loss)
    if losses:
        lines += training_loss_tables(losses)
    return lines, {"summary": summary, "last_epoch_train_loss": losses}


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


def constant_label_scores(eval_sets: dict[str, str], model_labels: tuple[str, ...]) -> dict:
    """``{name: accuracy x 100}`` of the best constant prediction of the model's labels on each
    evaluation set that can be read here (local files; hub sets are skipped), scored as the model
    is (``extra_eval.merged_accuracy``)."""
    from childtuning_trainer import extra_eval

    scores = {}
    for name, path in eval_sets.items():
        if path.startswith(extra_eval.HUB_PREFIX) or not os.path.isfile(path):
            continue
        extra = extra_eval.read_set(name, path)
        gold = np.asarray(extra.examples.labels)
        scores[name] = 100 * max(
            extra_eval.merged_accuracy(np.full_like(gold, label), model_labels, gold, extra.labels)
            for label in range(len(model_labels))
        )
    return scores


def _domain_report(protocol: Protocol, records: list[dict], out_dir: str) -> tuple[list, dict]:
    table: dict = defaultdict(lambda: defaultdict(list))
    baselines: dict = defaultdict(list)
    for r in records:
        o = r["overrides"]
        row = f"{o['task']} {method_label(o)}"
        table[row][f"{o['task']} (in-domain)"].append(100 * r["eval"]["accuracy"])
        for name, res in r.get("extra_eval", {}).items():
            table[row][name].append(100 * res["accuracy"])
        if "baseline" in r:
            baselines[f"{o['task']} (in-domain)"].append(100 * r["baseline"]["eval"]["accuracy"])
    rows = sorted(table)
    cols = sorted(
        {c for row in table.values() for c in row}, key=lambda c: ("in-domain" not in c, c)
    )
    lines = ["| source, method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    values = np.full((len(rows), len(cols)), np.nan)
    summary: dict = {}
    for i, row in enumerate(rows):
        cells = []
        for j, col in enumerate(cols):
            vals = table[row].get(col)
            stats = mean_std(vals) if vals else None
            if stats:
                values[i, j] = stats["mean"]
                summary.setdefault(row, {})[col] = {**stats, "values": vals}
            cells.append(cell(stats))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if rows:
        model_labels = tuple(get_task(records[0]["overrides"]["task"]).labels)
        constant = constant_label_scores(protocol.settings.get("eval_sets", {}), model_labels)
        trivial = [
            f"{np.mean(baselines[c]):.1f}"
            if c in baselines
            else f"{constant[c]:.1f}"
            if c in constant
            else "–"
            for c in cols
        ]
        lines.append("| trivial | " + " | ".join(trivial) + " |")
        lines += [
            "",
            "trivial: in-domain, the training subset's majority class (mean over seeds); "
            "elsewhere, the set's most frequent label (the best any constant prediction scores).",
        ]
        heat_map(
            rows,
            cols,
            values,
            f"{protocol.name}: accuracy x 100",
            os.path.join(out_dir, "heat_map.png"),
        )
        lines += ["", "![accuracy heat map](heat_map.png)"]
    return lines + [""], {"summary": summary}


def _taskgen_report(protocol: Protocol, records: list[dict], out_dir: str) -> tuple[list, dict]:
    groups: dict = defaultdict(lambda: defaultdict(dict))
    metric_names = {}
    for spec, target in protocol.probes:
        path = probe_path(spec, target)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            probe = json.load(f)
        o = dict(spec.overrides)
        metric_names[target] = probe["metric"]
        groups[target][method_label(o)][o.get("seed", 42)] = 100 * probe["eval"][probe["metric"]]
    tasks = {
        t: {m: {**mean_std(list(s.values())), "seeds": s} for m, s in ms.items()}
        for t, ms in groups.items()
    }
    lines = ["## Source-task runs", ""]
    lines += _table_report(protocol, records, out_dir)[0]
    lines += ["## Linear probes on the frozen encoder, by source method", ""]
    lines += ["`pretrained`: the encoder before fine-tuning, the reference.", ""]
    if tasks:
        lines += markdown_table(tasks, metric_names) + [""]
        bar_plot(tasks, f"{protocol.name}: linear probes", os.path.join(out_dir, "probes.png"))
        lines += ["![linear probes](probes.png)", ""]
    return lines, {"summary": tasks}


def probe_path(source: RunSpec, target: str, probes_dir: str = PROBES_DIR) -> str:
    return os.path.join(probes_dir, f"{source.run_id}--{target}.json")


def write_report(name: str, reports_dir: str = REPORTS_DIR) -> str:
    """Writes ``report.md``, ``summary.json`` and plots of protocol ``name``; returns the report."""
    protocol = load_protocol(name, reports_dir)
    out_dir = os.path.join(reports_dir, name)
    records = store.load_results(protocol.specs)
    build = {"domain": _domain_report, "taskgen": _taskgen_report}.get(protocol.kind, _table_report)
    body, summary = build(protocol, records, out_dir) if records else ([], {})
    lines = _header(protocol, records) + body
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    per_run = [
        {
            "run_id": r["run_id"],
            "overrides": r["overrides"],
            "eval": r["eval"],
            "extra_eval": r.get("extra_eval"),
            "wall_time_s": r["wall_time_s"],
            "last_epoch_train_loss": store.last_epoch_train_loss(r),
        }
        for r in records
    ]
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "runs": per_run}, f, indent=1, sort_keys=True)
        f.write("\n")
    return path
