"""What every task gives the trainer: its examples, its label set, its evaluation sets, its metrics.

A task is any object with the attributes of :class:`Task`. GLUE (``tasks.glue``) is one family;
others register themselves in :mod:`childtuning_trainer.tasks` without touching the training loop.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class DataError(ValueError):
    """A data file or folder that cannot be read as its task expects."""


def split_row(line: str, width: int, where: str, error: type[DataError] = DataError) -> list[str]:
    """The tab-separated fields of one row of a table file; ``error`` (naming ``where``, the
    file and line) when there are not ``width`` of them."""
    fields = line.split("\t")
    if len(fields) != width:
        raise error(
            f"{where}: malformed row, {len(fields)} tab-separated field(s) where "
            f"{width} were expected."
        )
    return fields


class Examples(NamedTuple):
    """The examples of one split, as parallel columns.

    Attributes:
      text_a: the first (or only) text of every example.
      text_b: the second text of every example, ``None`` for single-sentence tasks.
      labels: label ids (int32), or float32 targets for regression.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    def select(self, indices: np.ndarray) -> Examples:
        """The examples at ``indices``, in that order."""
        pick = lambda texts: None if texts is None else [texts[i] for i in indices]
        return Examples(pick(self.text_a), pick(self.text_b), self.labels[np.asarray(indices)])


class TestSplit(NamedTuple):
    """An unlabelled split to predict (e.g. a GLUE test set).

    Attributes:
      name: the predictions file's name, ``predictions/<name>.tsv``.
      ids: each example's id (the file's index column), in file order.
      examples: the texts; the labels are placeholders (0).
      submission: the benchmark's name for the predictions file (GLUE: ``RTE.tsv``), or ``None``.
    """

    name: str
    ids: list[str]
    examples: Examples
    submission: str | None = None


class EvalSet(Protocol):
    """One evaluation split: ``name`` identifies it in results; ``suffix`` ends its metric names."""

    @property
    def name(self) -> str: ...

    @property
    def suffix(self) -> str: ...


class Task(Protocol):
    """The trainer's view of a task.

    Attributes:
      name: the registry name, e.g. ``rte``.
      labels: label strings in label-id order; empty for regression.
      metrics: metric names (see :mod:`childtuning_trainer.tasks.metrics`); the first one selects
        the best epoch.
      dev_sets: the evaluation splits, in the order ``load_splits`` returns them.

    A task may also have ``load_test_splits(data_dir) -> list[TestSplit]``: the unlabelled splits
    present in ``data_dir`` to write predictions for (``childtuning_trainer.predictions``).
    """

    name: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def dev_sets(self) -> tuple[EvalSet, ...]: ...

    @property
    def is_regression(self) -> bool: ...

    @property
    def num_labels(self) -> int: ...

    def load_splits(self, data_dir: str | None) -> tuple[Examples, list[Examples]]:
        """The training split and every evaluation split; ``data_dir`` empty: the hub's copy."""
        ...
