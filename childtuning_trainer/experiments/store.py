"""Where a sweep's runs work and where their results accumulate.

A run is named by its configuration overrides (:func:`RunSpec.run_id`), so the same run requested
by two protocols is trained once. Finished runs are lines of one append-only JSON-lines file
(``experiments/runs.jsonl``: a line a run, its run id, command and results), probes of another
(``experiments/probes.jsonl``); a run without a line is unfinished and is resumed (or started) by
the next sweep. A line is written whole under an exclusive ``flock``, so concurrent sweeps never
interleave lines, and a key already recorded is not appended again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

REPORTS_DIR = "experiments"
RESULTS_NAME, PROBES_NAME = "runs.jsonl", "probes.jsonl"
RESULTS_FILE = os.path.join(REPORTS_DIR, RESULTS_NAME)
PROBES_FILE = os.path.join(REPORTS_DIR, PROBES_NAME)
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


def _parse(text: str, path: str, key: str) -> dict[str, dict]:
    """``{record[key]: record}`` of the lines of ``text``; the first line of a key wins."""
    records: dict[str, dict] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.setdefault(record[key], record)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {number}: not a JSON record with {key!r} ({e}).") from e
    return records


def recorded(path: str = RESULTS_FILE, key: str = "run_id") -> dict[str, dict]:
    """Every record of the JSON-lines file ``path`` by its ``key`` (empty if there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # a line being appended is read whole or not at all
        return _parse(f.read(), path, key)


def append_record(record: dict, path: str = RESULTS_FILE, key: str = "run_id") -> bool:
    """Appends ``record`` as one line unless its ``key`` is already recorded; returns whether it
    did. The check and the write hold an exclusive lock; the line goes out in one ``O_APPEND``
    write, so two processes appending at once never interleave."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, closefd=False) as f:
            if record[key] in _parse(f.read(), path, key):
                return False
        while line:
            line = line[os.write(fd, line) :]
        return True
    finally:
        os.close(fd)  # releases the lock


def load_result(spec: RunSpec, path: str = RESULTS_FILE) -> dict | None:
    """The finished run's record, or ``None``."""
    return recorded(path).get(spec.run_id)


def save_result(spec: RunSpec, record: dict, path: str = RESULTS_FILE) -> bool:
    """Records the finished run (its ``run_id`` set to the spec's); False if it was already."""
    return append_record({**record, "run_id": spec.run_id}, path)


def load_results(specs: Iterable[RunSpec], path: str = RESULTS_FILE) -> list[dict]:
    """The records of the finished runs among ``specs``, in order."""
    records = recorded(path)
    return [records[spec.run_id] for spec in specs if spec.run_id in records]


def probe_id(source: RunSpec, target: str) -> str:
    """The name of the linear probe of ``source``'s encoder on ``target``."""
    return f"{source.run_id}--{target}"


def load_probe(source: RunSpec, target: str, path: str = PROBES_FILE) -> dict | None:
    return recorded(path, "probe_id").get(probe_id(source, target))


def save_probe(source: RunSpec, target: str, result: dict, path: str = PROBES_FILE) -> bool:
    return append_record({**result, "probe_id": probe_id(source, target)}, path, "probe_id")
