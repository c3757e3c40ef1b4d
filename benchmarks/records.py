"""The suite's records: a run's JSON, the RESULTS.md rebuilt from them, and plots (shared by
``run`` and ``gpu_profile``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
from typing import Any

from benchmarks import common, plots, results_table

HERE = os.path.dirname(os.path.abspath(__file__))


def add_training_throughput(results: dict[str, Any]) -> None:
    """Puts training throughput (ours, vanilla, from the train-step benchmark of the same run and
    the same shapes) next to the Fisher pass's."""
    for label, fisher in results.get("fisher_pass", {}).items():
        train = results.get("train_step", {}).get(label, {})
        same_shapes = all(train.get(k) == fisher.get(k) for k in ("batch_size", "seq_len"))
        if "times" not in train or "fisher_per_batch_s" not in fisher or not same_shapes:
            continue
        step_s = train["times"]["ours/vanilla"]["median_s"]
        fisher["examples_per_s"]["train_step (from train_step)"] = train["batch_size"] / step_s
        fisher["fisher_per_batch_over_train_step"] = fisher["fisher_per_batch_s"] / step_s


def write_json(record: dict[str, Any], out_dir: str) -> str:
    """Writes (or rewrites) ``out_dir/results/<stamp>-<suite>.json``; returns its path."""
    os.makedirs(os.path.join(out_dir, "results"), exist_ok=True)
    stamp = record["started"].replace(":", "").replace("-", "").replace("+0000", "")
    record["json"] = f"results/{stamp}-{record['suite']}.json"
    path = os.path.join(out_dir, record["json"])
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(path + ".tmp", path)  # a reader (or a kill) never sees half a file
    return path


def write_outputs(record: dict[str, Any], out_dir: str, *, plots: bool = True) -> dict[str, str]:
    """JSON under ``out_dir/results/``, ``out_dir/RESULTS.md`` rebuilt from all of them, plots."""
    written = {"json": write_json(record, out_dir)}
    if plots:
        written.update(draw_plots(record, out_dir))
    written["results_md"] = results_table.write(out_dir)
    return written


def draw_plots(record: dict[str, Any], out_dir: str) -> dict[str, str]:
    m = record["machine"]
    where = f"{m.get('device_kind', '?')}, {m['cpu_count']} cores, {record['started'][:10]}"
    suffix = "" if record["suite"] == "cpu" else f"_{record['suite']}"
    written = {}
    results = record["results"]
    train = {k: v for k, v in results.get("train_step", {}).items() if "times" in v}
    if train:
        path = plots.step_times(
            train, os.path.join(out_dir, f"step_time{suffix}.png"), f"Train step ({where})"
        )
        if path:
            written["step_time_png"] = path
    mask = results.get("mask_selection", {})
    if "main" in mask:
        path = plots.mask_selection(
            mask,
            os.path.join(out_dir, f"mask_selection{suffix}.png"),
            f"Mask selection, p=0.3 ({where})",
        )
        if path:
            written["mask_selection_png"] = path
    return written


def new_record(suite: str, argv: list[str]) -> dict[str, Any]:
    return {
        "suite": suite,
        "command": " ".join(["python -m benchmarks.run", *map(shlex.quote, argv)]),
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000"),
        "machine": common.machine_info(),
        "load_start": list(os.getloadavg()),
    }
