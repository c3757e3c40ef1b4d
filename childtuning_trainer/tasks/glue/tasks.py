"""The nine GLUE tasks: where their files are, which columns hold text and label, how to score them.

Labels are numbered as in the Hugging Face ``nyu-mll/glue`` dataset, so a model fine-tuned from the
original TSV files and one fine-tuned from the hub agree on what class ``i`` means.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from childtuning_trainer.tasks.base import Examples, TestSplit
from childtuning_trainer.tasks.glue import data


class DevSet(NamedTuple):
    """One evaluation split of a task.

    Attributes:
      filename: the file inside the task folder, e.g. ``dev.tsv``.
      hub_split: the split's name in the ``nyu-mll/glue`` hub dataset.
      suffix: appended to every metric name of this split (MNLI mismatched: ``_mm``).
    """

    filename: str
    hub_split: str
    suffix: str = ""

    @property
    def name(self) -> str:
        return self.filename


class TestSet(NamedTuple):
    """One unlabelled test split of a task: its file (relative to the task folder), GLUE's name
    for the submission file of its predictions (``MNLI-m.tsv``), and its split on the hub
    (``None``: not in the task's ``nyu-mll/glue`` config)."""

    filename: str
    submission: str
    hub_split: str | None = "test"

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.filename))[0]


class GlueTask(NamedTuple):
    """What the readers, the trainer and the metrics need to know about a GLUE task.

    Attributes:
      name: the task's short name, e.g. ``rte`` (also its ``nyu-mll/glue`` config name).
      folder: its folder in the original GLUE layout, e.g. ``RTE``.
      text_columns: header names of the one or two text columns (the hub uses the same names).
      label_column: header name of the label column.
      labels: the label strings as written in the TSV files, in label-id order; empty for
        regression (STS-B).
      metrics: GLUE's metric names for the task, the first one selects the best epoch.
      header: the column names of a file without a header line (CoLA); ``None`` if the files start
        with one.
      dev_sets: the evaluation splits (two for MNLI).
      hub_text_columns: the text columns' names on the hub, when they differ from the TSV header.
      label_range: the closed interval a regression target must lie in.
      test_sets: the unlabelled test splits; empty: ``test.tsv``, submitted as ``<folder>.tsv``.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    header: tuple[str, ...] | None = None
    dev_sets: tuple[DevSet, ...] = (DevSet("dev.tsv", "validation"),)
    hub_text_columns: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None
    test_sets: tuple[TestSet, ...] = ()

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Size of the model's output layer (1 for regression)."""
        return len(self.labels) or 1

    def load_splits(self, data_dir: str | None) -> tuple[Examples, list[Examples]]:
        """The training and dev splits from a GLUE folder, or from the hub if it is empty."""
        return data.load_splits(self, data_dir)

    def tests(self) -> tuple[TestSet, ...]:
        """The test splits (:attr:`test_sets`, or the default ``test.tsv``)."""
        return self.test_sets or (TestSet("test.tsv", f"{self.folder}.tsv"),)

    def load_test_splits(self, data_dir: str | None) -> list[TestSplit]:
        """The test splits in the GLUE folder ``data_dir``, or on the hub if it is empty."""
        return data.load_test_splits(self, data_dir)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            name="cola",
            folder="CoLA",
            text_columns=("sentence",),
            label_column="label",
            labels=_BINARY,
            metrics=("matthews_correlation",),
            header=("source", "label", "mark", "sentence"),
        ),
        GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, ("accuracy",)),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            labels=_BINARY,
            metrics=("f1", "accuracy"),
            hub_text_columns=("sentence1", "sentence2"),
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_column="score",
            labels=(),
            metrics=("pearson", "spearmanr"),
            label_range=(0.0, 5.0),
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            labels=_BINARY,
            metrics=("f1", "accuracy"),
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            labels=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            dev_sets=(
                DevSet("dev_matched.tsv", "validation_matched"),
                DevSet("dev_mismatched.tsv", "validation_mismatched", "_mm"),
            ),
            hub_text_columns=("premise", "hypothesis"),
            # GLUE's diagnostic set (AX) is predicted by the MNLI model.
            test_sets=(
                TestSet("test_matched.tsv", "MNLI-m.tsv", "test_matched"),
                TestSet("test_mismatched.tsv", "MNLI-mm.tsv", "test_mismatched"),
                TestSet("../diagnostic/diagnostic.tsv", "AX.tsv", None),
            ),
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
        # WNLI's files write 1 for entailment; the hub's names are (not_entailment, entailment).
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, ("accuracy",)),
    )
}


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive; ``sst-2`` and ``sts-b`` are accepted too)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; expected one of {', '.join(TASKS)}.")
    return TASKS[key]
