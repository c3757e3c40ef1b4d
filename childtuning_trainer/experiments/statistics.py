"""The numbers of a report: scores, mean ± sample std over seeds, and how they are grouped.

Scores are the dev metric after the last epoch, x 100; a summary groups them by setting, task and
method (:func:`summarize`), keeping the per-seed values.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from childtuning_trainer.experiments.protocols import method_label

MODE_ORDER = ("vanilla", "F", "D")
METHOD_ORDER = ("pretrained", "vanilla", "F", "D", "D pruned", "D random", "D lowest-Fisher")


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


def last_epoch_train_loss(record: dict) -> float | None:
    """The mean training loss over the steps of a record's last epoch, or ``None`` (records made
    before the sweep kept the logged losses). Each logged line is the mean since the previous line,
    and the trainer logs at every epoch's end, so the lines weighted by their steps give it."""
    logged = record.get("train_loss")
    if not logged:
        return None
    total = steps = 0.0
    previous = 0
    for line in logged:
        if line["epoch"] == logged[-1]["epoch"]:
            total += line["loss"] * (line["step"] - previous)
            steps += line["step"] - previous
        previous = line["step"]
    return total / steps


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


def method_order(tasks: dict) -> list[str]:
    """The methods found in ``{task: {method: ...}}``: the known ones in order, then the others."""
    found = {m for methods in tasks.values() for m in methods}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


def by_regularizer(methods: dict) -> dict[str, dict[str, dict]]:
    """``{regulariser: {mode: stats}}`` from method labels ``MODE`` / ``MODE + REGULARISER``."""
    table: dict = defaultdict(dict)
    for label, stats in methods.items():
        mode, _, regularizer = label.partition(" + ")
        table[regularizer or "none"][mode] = stats
    return dict(table)


def has_regularizers(tasks: dict) -> bool:
    """True when some method combines a regulariser with a mode: a row per regulariser then
    reads better than a column per combination."""
    return any(" + " in m for methods in tasks.values() for m in methods)


def regularizer_layout(tasks: dict) -> tuple[dict, list[str], list[str]]:
    """``({task: by_regularizer(...)}, regularisers with none first, modes in MODE_ORDER)``."""
    tables = {task: by_regularizer(methods) for task, methods in tasks.items()}
    regs = {r for table in tables.values() for r in table}
    modes = {m for table in tables.values() for row in table.values() for m in row}
    ordered_modes = [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))
    return tables, sorted(regs, key=lambda r: (r != "none", r)), ordered_modes


def paired_gains(tables: dict, modes: list[str]) -> dict:
    """``{task: {regulariser: {mode: stats}}}`` of each mode's score minus vanilla's with the same
    regulariser and seed (a seed fixes the training subset and the classifier's initialisation, so
    the two runs of a seed pair up); seeds without both runs are left out."""
    gains: dict = {}
    for task, table in tables.items():
        for reg, row in table.items():
            base = row.get("vanilla", {}).get("seeds", {})
            for m in modes:
                seeds = row.get(m, {}).get("seeds", {})
                paired = [seeds[s] - base[s] for s in sorted(seeds) if s in base]
                if paired:
                    gains.setdefault(task, {}).setdefault(reg, {})[m] = mean_std(paired)
    return gains


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
