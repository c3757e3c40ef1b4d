"""The NLI tasks beyond GLUE: SNLI, MNLI matched from JSON lines, and SICK.

``config.data_dir`` is an NLI folder holding ``snli/``, ``mnli/`` and ``sick/``; empty: the one
under ``$CHILDTUNING_DATA_DIR`` (:mod:`childtuning_trainer.data_location`), else the hub's copies.
Labels are three-way in the hub's snli / mnli id order.

- ``snli``: ``snli/train.jsonl`` for training and ``snli/dev.jsonl`` for evaluation. Hub:
  ``stanfordnlp/snli`` train / validation, unlabelled (-1) pairs dropped.
- ``mnli_m``: MNLI, matched genres only, from ``mnli/train.jsonl`` and ``mnli/dev_matched.jsonl``
  (GLUE's ``mnli`` reads the TSV files and scores both dev sets). Hub: ``nyu-mll/glue`` mnli
  train / validation_matched.
- ``sick``: the original ``sick/SICK.txt``, trained on its SemEval TRAIN split and evaluated on
  TEST (TRIAL is unused). Hub: ``RobZamp/sick`` (its parquet conversion) train / test, not
  testable offline.

Deviation from the paper, which trains on 5k examples of the MNLI or SNLI training set: without a
``train.jsonl`` (the case of the tests' NLI folder, which has the dev files only) the dev file is
split once, with a fixed seed independent of the run's seed (``data.fixed_split``), into a training
pool and a held-out rest, which is the in-domain dev set of every run.
``config.max_train_samples`` then draws each run's seeded training subset from the pool.
"""

from __future__ import annotations

from typing import NamedTuple

from childtuning_trainer.tasks.base import Examples
from childtuning_trainer.tasks.nli import data


class DevSet(NamedTuple):
    """An NLI task's evaluation split: its name in results, no metric suffix."""

    name: str
    suffix: str = ""


class NliTask(NamedTuple):
    """A three-way NLI task read from an NLI folder or the hub.

    Attributes:
      name: the registry name, e.g. ``snli``.
      folder: its folder inside the NLI data folder, e.g. ``snli``.
      dev_file: the evaluation file in that folder (SICK: the one file of all splits).
      train_file: the training file, split off ``dev_file`` when absent; ``None`` for SICK.
      hub: where the task is on the hub.
      dev_name: the evaluation split's name in results.
    """

    name: str
    folder: str
    dev_file: str
    train_file: str | None
    hub: data.HubSource
    dev_name: str = "dev"
    labels: tuple[str, ...] = data.LABELS_3
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def dev_sets(self) -> tuple[DevSet, ...]:
        return (DevSet(self.dev_name),)

    @property
    def is_regression(self) -> bool:
        return False

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def load_splits(self, data_dir: str | None) -> tuple[Examples, list[Examples]]:
        """The training and dev splits from an NLI folder, or from the hub if it is empty."""
        return data.load_splits(self, data_dir)


TASKS: dict[str, NliTask] = {
    t.name: t
    for t in (
        NliTask(
            "snli",
            "snli",
            "dev.jsonl",
            "train.jsonl",
            data.HubSource("stanfordnlp/snli", None, "train", "validation"),
        ),
        NliTask(
            "mnli_m",
            "mnli",
            "dev_matched.jsonl",
            "train.jsonl",
            data.HubSource("nyu-mll/glue", "mnli", "train", "validation_matched"),
            dev_name="dev_matched",
        ),
        NliTask(
            "sick",
            "sick",
            "SICK.txt",
            None,
            data.HubSource(
                "RobZamp/sick",
                None,
                "train",
                "test",
                ("sentence_A", "sentence_B"),
                revision="refs/convert/parquet",
            ),
            dev_name="test",
        ),
    )
}
