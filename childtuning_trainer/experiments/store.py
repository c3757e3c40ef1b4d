"""Where a sweep's runs work and where their results accumulate.

A run is named by its configuration overrides (:func:`run_id`), so the same run requested by two
protocols is trained once. Its results are one JSON file, written atomically once the run has
finished; a run without that file is unfinished and is resumed (or started) by the next sweep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

RESULTS_DIR = os.path.join("experiments", "runs")
WORK_DIR = os.path.join("runs", "sweep")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: ``train.py`` with these ``--config.KEY=VALUE`` overrides.

    ``overrides`` are sorted (key, value) pairs; :attr:`run_id` is a readable name of the main
    settings followed by a hash of all of them, so two specs with the same settings share a name.
    """

    overrides: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, **overrides: Any) -> RunSpec:
        return cls(tuple(sorted(overrides.items())))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.overrides).get(key, default)

    @property
    def run_id(self) -> str:
        o = dict(self.overrides)
        parts = [str(o.get("task", "task")), str(o.get("mode", "D"))]
        if o.get("mask_rule", "fisher") != "fisher":
            parts.append(str(o["mask_rule"]))
        if o.get("prune"):
            parts.append("prune")
        if o.get("regularizer", "none") != "none":
            parts.append(str(o["regularizer"]))
        if o.get("reserve_p") is not None:
            parts.append(f"p{o['reserve_p']:g}")
        parts.append(f"n{o.get('max_train_samples', 0)}")
        if "learning_rate" in o:
            parts.append(f"lr{o['learning_rate']:g}")
        parts.append(f"s{o.get('seed', 42)}")
        digest = hashlib.sha1(json.dumps(self.overrides, sort_keys=True).encode()).hexdigest()
        return "-".join(parts) + "-" + digest[:8]


def result_path(spec: RunSpec, results_dir: str = RESULTS_DIR) -> str:
    return os.path.join(results_dir, spec.run_id + ".json")


def load_result(spec: RunSpec, results_dir: str = RESULTS_DIR) -> dict | None:
    """The finished run's record, or ``None``."""
    path = result_path(spec, results_dir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_result(spec: RunSpec, record: dict, results_dir: str = RESULTS_DIR) -> str:
    """Writes the record atomically (a temporary file renamed); returns its path."""
    os.makedirs(results_dir, exist_ok=True)
    path = result_path(spec, results_dir)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def load_results(specs: Iterable[RunSpec], results_dir: str = RESULTS_DIR) -> list[dict]:
    """The records of the finished runs among ``specs``, in order."""
    records = (load_result(spec, results_dir) for spec in specs)
    return [r for r in records if r is not None]


def logged_train_losses(output_dir: str) -> list[dict[str, Any]]:
    """The training-loss lines of a run's ``metrics.jsonl`` (step, epoch, mean loss since the
    previous line), in order; empty if the run logged none."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [{k: line[k] for k in ("step", "epoch", "loss")} for line in lines if "loss" in line]


def last_epoch_train_loss(record: dict) -> float | None:
    """The mean training loss over the steps of a record's last epoch, or ``None`` (records made
    before the sweep kept the logged losses). Each logged line is the mean since the previous one,
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
