"""Rebuilds the report of one or more experiment protocols from their accumulated results.

  python report.py fewshot pruning

Reads ``experiments/<name>/protocol.json`` (written by ``sweep.py``) and the finished runs in
``experiments/runs.jsonl`` (probes: ``experiments/probes.jsonl``); writes ``report.md``,
``summary.json`` and the plots to ``experiments/<name>/``.
With no name, every protocol under ``experiments/``.
"""

import os
import sys

from absl import app

from childtuning_trainer.experiments import protocol_reports, protocols, store


def main(argv: list[str]) -> None:
    names = argv[1:] or sorted(
        d for d in os.listdir(store.REPORTS_DIR) if os.path.exists(protocols.protocol_path(d))
    )
    for name in names:
        try:
            print(protocol_reports.write_report(name))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
