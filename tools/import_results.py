"""Appends run and probe records to ``experiments/runs.jsonl`` and ``experiments/probes.jsonl``.

  python tools/import_results.py experiments/runs experiments/probes   # the old layout
  python tools/import_results.py /tmp/gpu/experiments/runs.jsonl       # a GPU machine's records

A SOURCE is a folder of JSON files, one a record (``<run_id>.json`` for a run,
``<source_run_id>--<target>.json`` for a probe: the layout before the JSON-lines files), or a
JSON-lines file of records (a line with ``probe_id`` is a probe, else a run). Files are read in
name order; a record already in the destination is skipped, so the command can be repeated.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from childtuning_trainer.experiments import store  # noqa: E402


def records_of(source: str) -> list[dict]:
    """The records of a SOURCE; a probe file's record gains its ``probe_id`` (its name)."""
    if os.path.isfile(source):
        with open(source) as f:
            return [json.loads(line) for line in f if line.strip()]
    records = []
    for name in sorted(n for n in os.listdir(source) if n.endswith(".json")):
        with open(os.path.join(source, name)) as f:
            record = json.load(f)
        if "--" in name:
            record["probe_id"] = name[: -len(".json")]
        records.append(record)
    return records


def import_results(
    sources: list[str],
    runs_file: str = store.RESULTS_FILE,
    probes_file: str = store.PROBES_FILE,
) -> tuple[int, int]:
    """Appends the records of ``sources`` not recorded yet; returns (runs, probes) appended."""
    runs = probes = 0
    for source in sources:
        for record in records_of(source):
            if "probe_id" in record:
                probes += store.append_record(record, probes_file, "probe_id")
            else:
                runs += store.append_record(record, runs_file)
    return runs, probes


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    missing = [s for s in argv[1:] if not os.path.exists(s)]
    if missing:
        sys.exit(f"error: no such file or folder: {', '.join(missing)}")
    runs, probes = import_results(argv[1:])
    print(f"{runs} run(s) and {probes} probe(s) appended")


if __name__ == "__main__":
    main(sys.argv)
