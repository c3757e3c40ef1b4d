"""Your own data: ``config.task = "csv"`` or ``"jsonl"``, read from the files the config names.

- ``csv``: a header line, then one example per row (comma-separated, CSV quoting; a ``.tsv``
  file is tab-separated). ``jsonl``: one JSON object per line.
- ``text_columns``: one column (single texts) or two (pairs, e.g. ``premise,hypothesis``);
  ``label_column``: the label.
- ``label_type = "classification"`` (the default): any label set, read from the training file and
  sorted (numerically when every label is an integer); label id ``i`` is ``labels[i]``, recorded
  in ``results.json``. Metrics: accuracy (selects the best epoch) and macro F1. A validation or
  test label the training file lacks is an error.
- ``label_type = "regression"``: float targets, one output. Metrics: Pearson (selects the best
  epoch) and Spearman. The type is set, never guessed: labels ``1..5`` may be either.
- ``test_file`` (optional) is scored like the validation file (metrics ending ``_test``) when it
  has the label column; without it, it holds examples to predict (:attr:`FileTask.test`).

Every file is read once, when the settings are read, so a bad file stops the run before any
weight is loaded, with one line naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import numpy as np

from childtuning_trainer.tasks.base import DataError, Examples

FORMATS = ("csv", "jsonl")
LABEL_TYPES = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class FileSettings:
    """Where your data is and which columns hold what (``configs/glue.py``'s own-data keys)."""

    format: str
    train_file: str
    validation_file: str
    test_file: str = ""
    text_columns: str = "sentence"
    label_column: str = "label"
    label_type: str = "classification"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.text_columns.split(","))

    def check(self) -> None:
        """Raises ``ValueError`` naming the first bad key (the files are not opened)."""
        if self.label_type not in LABEL_TYPES:
            raise ValueError(
                f"Unknown label_type {self.label_type!r}; expected one of {', '.join(LABEL_TYPES)}."
            )
        if not 1 <= len(self.columns) <= 2 or not all(self.columns):
            raise ValueError(
                f"config.text_columns={self.text_columns!r} must name one or two columns "
                "(comma-separated)."
            )
        if not self.label_column:
            raise ValueError("config.label_column is empty; name the column of the labels.")
        for key in ("train_file", "validation_file"):
            if not getattr(self, key):
                raise ValueError(f"config.{key} is empty; task {self.format!r} reads it.")
        for key in ("train_file", "validation_file", "test_file"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ValueError(f"config.{key}={path!r}: no such file.")


class Row(NamedTuple):
    """One example as read: its line number and its fields by column (``None``: absent)."""

    line: int
    fields: dict[str, Any]


def read_rows(path: str, format: str) -> list[Row]:
    """The rows of a CSV (header line first) or JSON-lines file."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if format == "jsonl":
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: not JSON ({e.msg}).") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line}: not a JSON object.")
                rows.append(Row(line, record))
            return rows
        reader = csv.reader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header line.")
        start = reader.line_num + 1
        for values in reader:
            if not values:
                start = reader.line_num + 1
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{start}: {len(values)} fields where the header has {len(header)}."
                )
            rows.append(Row(start, dict(zip(header, values, strict=True))))
            start = reader.line_num + 1
    return rows


def _column(row: Row, path: str, column: str, key: str) -> Any:
    """``row``'s value of ``column``; a missing one names the file, line, column and key."""
    if column not in row.fields:
        known = ", ".join(map(str, row.fields)) or "none"
        raise DataError(
            f"{path}:{row.line}: no column {column!r} (config.{key}); columns: {known}."
        )
    return row.fields[column]


def _text(row: Row, path: str, column: str) -> str:
    value = _column(row, path, column, "text_columns")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{row.line}: column {column!r} is not text: {value!r}.")
    if not value.strip():
        raise DataError(f"{path}:{row.line}: column {column!r} is empty.")
    return value


def _label_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _target(row: Row, path: str, column: str) -> float:
    """A regression target: a finite number, or a string that parses as one."""
    value = _column(row, path, column, "label_column")
    try:
        target = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        target = math.nan
    if not math.isfinite(target):
        raise DataError(
            f"{path}:{row.line}: column {column!r}: {value!r} is not a number "
            "(label_type regression)."
        )
    return target


def sorted_labels(values: set[str]) -> tuple[str, ...]:
    """The label set in id order: numerically if every label is an integer, else as strings."""

    def as_int(v: str) -> int | None:
        try:
            return int(v)
        except ValueError:
            return None

    if all(as_int(v) is not None for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


def read_examples(
    settings: FileSettings,
    path: str,
    labels: tuple[str, ...] | None,
    *,
    labelled: bool = True,
) -> tuple[Examples, tuple[str, ...]]:
    """One file's examples and the label set. Classification: ``labels`` is the label set
    (``None``: the training file, whose labels make it). ``labelled=False``: labels -1, for
    predictions."""
    rows = read_rows(path, settings.format)
    if not rows:
        raise DataError(f"{path}: no examples.")
    columns, label = settings.columns, settings.label_column
    texts = [[_text(row, path, c) for row in rows] for c in columns]
    known: tuple[str, ...] = labels or ()
    if not labelled:
        dtype = np.float32 if settings.label_type == "regression" else np.int32
        ids = np.full(len(rows), -1, dtype)
    elif settings.label_type == "regression":
        ids = np.asarray([_target(row, path, label) for row in rows], np.float32)
    else:
        names = [_label_text(_column(row, path, label, "label_column")) for row in rows]
        known = labels if labels is not None else sorted_labels(set(names))
        index = {name: i for i, name in enumerate(known)}
        for row, name in zip(rows, names, strict=True):
            if name not in index:
                raise DataError(
                    f"{path}:{row.line}: column {label!r}: label {name!r} is not in the training "
                    f"file's labels {list(known)}."
                )
        ids = np.asarray([index[name] for name in names], np.int32)
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, ids), known


def has_column(path: str, format: str, column: str) -> bool:
    """Whether the first row of ``path`` has ``column`` (a test file may come without labels)."""
    rows = read_rows(path, format)
    return bool(rows) and column in rows[0].fields


class DevSet(NamedTuple):
    name: str
    suffix: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class FileTask:
    """A task read from your own files (see the module docstring).

    Attributes:
      name: ``csv`` or ``jsonl``.
      labels: the training file's labels in id order; empty for regression.
      train, validation: the examples.
      test: the test file's examples (``None`` without a test file); scored as a dev set when
        ``test_labelled``, else labels -1.
    """

    name: str
    settings: FileSettings
    labels: tuple[str, ...]
    train: Examples
    validation: Examples
    test: Examples | None = None
    test_labelled: bool = False

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("pearson", "spearmanr") if self.is_regression else ("accuracy", "macro_f1")

    @property
    def is_regression(self) -> bool:
        return self.settings.label_type == "regression"

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def dev_sets(self) -> tuple[DevSet, ...]:
        return (DevSet("validation"),) + ((DevSet("test", "_test"),) if self.test_labelled else ())

    def load_splits(self, data_dir: str | None) -> tuple[Examples, list[Examples]]:
        """The training split and the dev splits (``data_dir`` is not used: the files are named)."""
        del data_dir
        dev = [self.validation] + ([self.test] if self.test_labelled else [])
        return self.train, dev


def load_task(settings: FileSettings) -> FileTask:
    """Checks ``settings`` and reads every file into a :class:`FileTask`.

    Raises:
      ValueError: a bad key; ``DataError`` (a ``ValueError``): a file that cannot be read, naming
        the file, the line and the column.
    """
    settings.check()
    train, labels = read_examples(settings, settings.train_file, None)
    if settings.label_type == "classification" and len(labels) < 2:
        raise DataError(
            f"{settings.train_file}: column {settings.label_column!r} holds one label "
            f"({labels[0]!r}); classification needs two or more."
        )
    validation, _ = read_examples(settings, settings.validation_file, labels)
    test, test_labelled = None, False
    if settings.test_file:
        test_labelled = has_column(settings.test_file, settings.format, settings.label_column)
        test, _ = read_examples(settings, settings.test_file, labels, labelled=test_labelled)
    return FileTask(settings.format, settings, labels, train, validation, test, test_labelled)
