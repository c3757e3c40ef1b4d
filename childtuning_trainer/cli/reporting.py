"""``childtuning-report``: rebuilds the report of one or more experiment protocols from their
accumulated results.

  childtuning-report fewshot pruning

Reads ``experiments/<name>/protocol.json`` (written by ``childtuning-sweep``) and the finished
runs in ``experiments/runs.jsonl`` (probes: ``experiments/probes.jsonl``), in the current folder;
writes ``report.md``, ``summary.json`` and the plots to ``experiments/<name>/``. With no name,
every protocol under ``experiments/``.
"""

from __future__ import annotations

import os
import sys

from absl import app

from childtuning_trainer.cli.usage import fail, help_asked, print_help
from childtuning_trainer.experiments import store


def protocol_names() -> list[str]:
    """Every protocol under ``experiments/``; an error line when there is no such folder or it
    holds none."""
    where = os.path.abspath(store.REPORTS_DIR)
    if not os.path.isdir(store.REPORTS_DIR):
        fail(f"no {store.REPORTS_DIR}/ folder in {os.getcwd()} (childtuning-sweep writes it)", 1)
    folders = sorted(os.listdir(store.REPORTS_DIR))
    names = [d for d in folders if os.path.exists(os.path.join(where, d, "protocol.json"))]
    if not names:
        fail(f"nothing to report: {where} holds no protocol (childtuning-sweep writes them)", 1)
    return names


def main(argv: list[str]) -> None:
    names = argv[1:] or protocol_names()
    from childtuning_trainer.experiments import protocol_reports  # JAX starts here

    for name in names:
        try:
            print(protocol_reports.write_report(name))
        except FileNotFoundError as e:
            fail(str(e), status=1)


def run(argv: list[str] | None = None) -> None:
    """The ``childtuning-report`` entry."""
    if help_asked(sys.argv if argv is None else argv):
        print_help("usage: childtuning-report [NAME ...]", __doc__)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
