"""Rebuilds ``RESULTS.md`` from the suite's records (``results/*.json``): per benchmark, the newest
measurement of each configuration on each kind of machine, with its date and record.

``python -m benchmarks.results_table`` rewrites ``benchmarks/RESULTS.md`` (``--check`` only says
whether it is current); ``python -m benchmarks.run`` and the GPU profile call it after every run.
The records keep the history; the table keeps the current numbers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

from benchmarks.result_cells import BENCHMARKS

HERE = os.path.dirname(os.path.abspath(__file__))
KIND_ORDER = ("cpu", "gpu")  # suites of committed records; smoke suites (tiny shapes) sort after


class Row(NamedTuple):
    """One table row: a configuration's newest measurement (or newest attempt) on a machine kind."""

    kind: str
    label: str
    record: dict[str, Any]
    entry: dict[str, Any] | None  # None: never measured on this kind
    reason: str = ""  # why the newest attempt measured nothing


def load_records(results_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, record)`` for every ``*.json`` in ``results_dir``, oldest first."""
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not JSON ({error})") from None
        missing = {"suite", "started", "machine", "results"} - set(record)
        if missing:
            raise ValueError(f"{path}: not a benchmark record (no {', '.join(sorted(missing))})")
        records.append((os.path.basename(path), record))
    return sorted(records, key=lambda nr: (nr[1]["started"], nr[0]))


def _entries(name: str, result: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """A benchmark's result split into configurations: ``(label, entry)``, each with its targets."""
    if "error" in result or "skipped" in result:
        yield "", result
        return
    targets = result.get("targets", {})
    if name == "mask_selection":
        entries = {**result.get("main", {}), **result.get("sweep", {})}
    elif name == "padding":
        run = {k: v for k, v in result.items() if k not in ("tasks", "targets")}
        entries = {task: {**t, "run": run} for task, t in result["tasks"].items()}
    elif name in ("memory", "pmap_scaling", "compile_cache"):
        yield "", {**result, "targets": targets}
        return
    else:
        entries = {k: v for k, v in result.items() if isinstance(v, dict) and k != "targets"}
    for label, entry in entries.items():
        own = {k: v for k, v in targets.items() if k.startswith(label + " ")}
        yield label, {**entry, "targets": {**entry.get("targets", {}), **own}}


def latest_rows(records: list[tuple[str, dict[str, Any]]]) -> dict[str, list[Row]]:
    """Per benchmark, the newest measurement of each (machine kind, configuration); where a
    configuration was only ever skipped or failed on a kind, its newest attempt."""
    measured: dict[tuple[str, str, str], Row] = {}
    attempted: dict[tuple[str, str, str], Row] = {}
    for file_name, record in records:
        record = {**record, "file": f"results/{file_name}"}
        kind = record["suite"]
        for name, result in record.get("results", {}).items():
            if name not in BENCHMARKS or not isinstance(result, dict):
                continue
            for label, entry in _entries(name, result):
                key = (name, kind, label)
                if "error" in entry or "skipped" in entry:
                    why = f"error: {entry['error']}" if "error" in entry else entry["skipped"]
                    attempted[key] = Row(kind, label, record, None, why)
                else:
                    measured[key] = Row(kind, label, record, entry)
        for skipped, reason in record.get("skipped", {}).items():
            name, _, label = skipped.partition(" [")
            attempted[(name, kind, label.rstrip("]"))] = Row(
                kind, label.rstrip("]"), record, None, f"skipped ({reason})"
            )
    rows: dict[str, list[Row]] = {name: [] for name in BENCHMARKS}
    for key, row in {**attempted, **measured}.items():
        rows[key[0]].append(row)
    order = {kind: i for i, kind in enumerate(KIND_ORDER)}
    for name in rows:
        rows[name].sort(key=lambda r: (order.get(r.kind, len(order)), r.kind, r.label))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _machine(record: dict[str, Any]) -> str:
    m = record["machine"]
    device = m.get("device_kind", "?")
    name = record["suite"] + ("" if device == "cpu" else f" {device}")
    load = f"load {record['load_start'][0]:.2g} -> {record['load_end'][0]:.2g}"
    return f"{name} ({m['cpu']}, {m['cpu_count']} cores); jax {m['jax']}; {load}"


def _targets(entry: dict[str, Any]) -> str:
    return "; ".join(
        f"{name}: {t['value']:.3g} ({'met' if t['met'] else '**missed**'})"
        for name, t in entry.get("targets", {}).items()
    )


def render(records: list[tuple[str, dict[str, Any]]]) -> str:
    """The whole ``RESULTS.md``; the same records give the same text."""
    out = [
        "# Benchmark results",
        "",
        "Rebuilt from the suite's records in [`results/`](results/) by `python -m "
        "benchmarks.results_table` (every `python -m benchmarks.run` rebuilds it); do not edit "
        "it by hand. Each benchmark shows, for each configuration, its newest measurement on each "
        "kind of machine (`cpu`: the CPU suite; `gpu`: the GPU profile, on the machine named in "
        "the row), with the record it comes from; earlier measurements stay in their records. "
        "A row measured the code of its date (`git log` says what changed since). Times are "
        "medians over alternating rounds; the load average at the start and end of the run is in "
        "the machine column. Plots from the latest suite run that drew them: "
        "[step_time.png](step_time.png), [step_time_gpu.png](step_time_gpu.png), "
        "[mask_selection.png](mask_selection.png).",
        "",
    ]
    for name, rows in latest_rows(records).items():
        if not rows:
            continue
        about, describe = BENCHMARKS[name]
        out += [f"## {name}", "", about, ""]
        out += ["| machine | configuration | measured | targets | date | record |"]
        out += ["|---|---|---|---|---|---|"]
        for row in rows:
            measured = (
                describe(row.entry) if row.entry is not None else f"not measured: {row.reason}"
            )
            targets = _targets(row.entry) if row.entry is not None else ""
            date = row.record["started"][:16].replace("T", " ")
            cells = [_machine(row.record), row.label or "-", measured, targets, date]
            cells = [_cell(c) for c in cells] + [f"[{row.record['file']}]({row.record['file']})"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write(out_dir: str = HERE) -> str:
    """Rewrites ``out_dir/RESULTS.md`` from ``out_dir/results/*.json``; returns its path."""
    path = os.path.join(out_dir, "RESULTS.md")
    if not os.path.isdir(os.path.join(out_dir, "results")):
        raise FileNotFoundError(f"no results/ folder of benchmark records in {out_dir}")
    text = render(load_records(os.path.join(out_dir, "results")))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild RESULTS.md from results/*.json.")
    parser.add_argument("--dir", default=HERE, help="folder holding RESULTS.md and results/")
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.dir, "results")):
        parser.error(f"no results/ folder of benchmark records in {args.dir}")
    try:
        text = render(load_records(os.path.join(args.dir, "results")))
    except ValueError as error:
        parser.error(str(error))
    if args.check:
        path = os.path.join(args.dir, "RESULTS.md")
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            print(
                f"{path} is not the rebuild of its records; run python -m benchmarks.results_table"
            )
            return 1
        return 0
    print(f"wrote {write(args.dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
