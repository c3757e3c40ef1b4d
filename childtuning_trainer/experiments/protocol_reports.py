"""One report per protocol, rebuilt from the recorded results.

``experiments/<name>/protocol.json`` lists the protocol's runs (written when its sweep starts);
:func:`write_report` reads the finished ones from ``experiments/runs.jsonl`` (and the probes from
``experiments/probes.jsonl``) and writes ``report.md``, ``summary.json`` and PNG plots beside it.
Scores are the dev metric after the last epoch, x 100, as mean ± sample standard deviation over
seeds, with the per-seed values in the JSON.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict

import numpy as np

from childtuning_trainer.experiments import figures, store
from childtuning_trainer.experiments.protocols import Protocol, load_protocol, method_label
from childtuning_trainer.experiments.statistics import (
    best_settings,
    constant_label_scores,
    has_regularizers,
    last_epoch_train_loss,
    mean_std,
    score,
    summarize,
    trivial_scores,
)
from childtuning_trainer.experiments.tables import (
    cell,
    child_tuning_gains,
    markdown_table,
    regularizer_tables,
    training_loss_tables,
)
from childtuning_trainer.tasks import get_task


def _header(protocol: Protocol, records: list[dict]) -> list[str]:
    seeds = sorted({r["overrides"].get("seed", 42) for r in records})
    lines = [f"# {protocol.name} ({protocol.kind})", ""]
    lines.append(f"{len(records)} of {len(protocol.specs)} runs finished; seeds {seeds}.")
    if records:
        lines.append(f"A run's command, e.g.: `{records[0]['command']}`")
    if protocol.settings:
        lines.append(f"Protocol settings: `{json.dumps(protocol.settings)}`.")
    return lines + [""]


GAINS_NOTE = (
    "Each cell: the mean ± std over seeds of a mode's score minus vanilla's with the same "
    "regulariser and seed (score x 100)."
)


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
            figures.regularizer_plot(tasks, title, os.path.join(out_dir, png), baselines)
            lines += [f"![{setting}]({png})", ""]
            if gains := child_tuning_gains(tasks):
                lines += [f"### What Child-Tuning adds to each regulariser ({setting})", ""]
                lines += [GAINS_NOTE, "", *gains]
        else:
            lines += markdown_table(tasks, metric_names, baselines) + [""]
            figures.bar_plot(tasks, title, os.path.join(out_dir, png))
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
    losses = summarize(records, last_epoch_train_loss)
    if losses:
        lines += training_loss_tables(losses)
    return lines, {"summary": summary, "last_epoch_train_loss": losses}


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
        title = f"{protocol.name}: accuracy x 100"
        figures.heat_map(rows, cols, values, title, os.path.join(out_dir, "heat_map.png"))
        lines += ["", "![accuracy heat map](heat_map.png)"]
    return lines + [""], {"summary": summary}


def _taskgen_report(
    protocol: Protocol, records: list[dict], out_dir: str, probes: dict[str, dict]
) -> tuple[list, dict]:
    """The source runs' tables, then the probes' (``probes``: the recorded ones by id)."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    metric_names = {}
    for spec, target in protocol.probes:
        probe = probes.get(store.probe_id(spec, target))
        if probe is None:
            continue
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
        figures.bar_plot(
            tasks, f"{protocol.name}: linear probes", os.path.join(out_dir, "probes.png")
        )
        lines += ["![linear probes](probes.png)", ""]
    return lines, {"summary": tasks}


def _per_run(record: dict) -> dict:
    """What ``summary.json`` keeps of each run."""
    return {
        "run_id": record["run_id"],
        "overrides": record["overrides"],
        "eval": record["eval"],
        "extra_eval": record.get("extra_eval"),
        "wall_time_s": record["wall_time_s"],
        "last_epoch_train_loss": last_epoch_train_loss(record),
    }


def write_report(name: str, reports_dir: str = store.REPORTS_DIR) -> str:
    """Writes ``report.md``, ``summary.json`` and plots of protocol ``name``; returns the report."""
    protocol = load_protocol(name, reports_dir)
    out_dir = os.path.join(reports_dir, name)
    records = store.load_results(protocol.specs, os.path.join(reports_dir, store.RESULTS_NAME))
    build = {"domain": _domain_report}.get(protocol.kind, _table_report)
    if protocol.kind == "taskgen":
        probes = store.recorded(os.path.join(reports_dir, store.PROBES_NAME), "probe_id")
        build = functools.partial(_taskgen_report, probes=probes)
    body, summary = build(protocol, records, out_dir) if records else ([], {})
    lines = _header(protocol, records) + body
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "runs": [_per_run(r) for r in records]}, f, indent=1, sort_keys=True)
        f.write("\n")
    return path
