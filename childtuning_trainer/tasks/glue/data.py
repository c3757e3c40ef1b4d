"""Reading GLUE splits: the original TSV files, or the ``nyu-mll/glue`` dataset on the hub.

The TSV files are read as the GLUE distribution writes them: tab-separated, UTF-8, no CSV quoting
(RTE and MRPC contain bare ``"`` characters), MRPC's header behind a byte-order mark, CoLA without a
header. Every row must have as many fields as the header; a row that does not, or whose label is
not one of the task's labels, stops the reader with the file and line number.
"""

from __future__ import annotations

import math
import os
import socket
import urllib.parse
from typing import TYPE_CHECKING

import datasets
import numpy as np

from childtuning_trainer.tasks.base import DataError, Examples, TestSplit, split_row

if TYPE_CHECKING:
    from childtuning_trainer.tasks.glue.tasks import GlueTask

HUB_DATASET = "nyu-mll/glue"


class GlueDataError(DataError):
    """A GLUE file or folder that cannot be read as the task expects."""


def split_path(task: GlueTask, data_dir: str, filename: str) -> str:
    """Path of ``filename`` in ``task``'s folder, checked to exist."""
    if not os.path.isdir(data_dir):
        raise GlueDataError(f"GLUE data folder {data_dir!r} does not exist.")
    folder = os.path.join(data_dir, task.folder)
    if not os.path.isdir(folder):
        raise GlueDataError(
            f"{data_dir!r} has no {task.folder}/ folder for task {task.name!r} "
            "(expected the original GLUE layout, e.g. RTE/train.tsv)."
        )
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise GlueDataError(f"Missing file {path!r} for task {task.name!r}.")
    return path


def parse_label(task: GlueTask, value: str, where: str) -> float | int:
    """The label id (or regression target) written as ``value``; ``where`` names the row."""
    if task.is_regression:
        try:
            target = float(value)
        except ValueError:
            raise GlueDataError(f"{where}: label {value!r} is not a number.") from None
        low, high = task.label_range or (-math.inf, math.inf)
        if not low <= target <= high:
            raise GlueDataError(f"{where}: label {value!r} is outside [{low:g}, {high:g}].")
        return target
    if value not in task.labels:
        raise GlueDataError(
            f"{where}: label {value!r} is not one of {task.name}'s labels {list(task.labels)}."
        )
    return task.labels.index(value)


def _lines(path: str) -> list[str]:
    """The lines of a GLUE TSV file (BOM, a last newline and CRs removed)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":  # the file ends with a newline (CoLA's dev.tsv does not)
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_tsv(task: GlueTask, path: str) -> Examples:
    """Reads one split of ``task`` from the GLUE TSV file at ``path``."""
    lines = _lines(path)
    first = 1
    header = task.header
    if header is None:
        if not lines:
            raise GlueDataError(f"{path}: empty file, expected a header line.")
        header = tuple(lines[0].split("\t"))
        first = 2
        lines = lines[1:]
    columns = [*task.text_columns, task.label_column]
    missing = [c for c in columns if c not in header]
    if missing:
        raise GlueDataError(
            f"{path}:1: header {list(header)} lacks column(s) {missing} of task {task.name!r}."
        )
    index = [header.index(c) for c in columns]
    texts: list[list[str]] = [[] for _ in task.text_columns]
    labels = []
    for lineno, line in enumerate(lines, start=first):
        where = f"{path}:{lineno}"
        fields = split_row(line, len(header), where, GlueDataError)
        for column, i in zip(texts, index[:-1], strict=True):
            column.append(fields[i])
        labels.append(parse_label(task, fields[index[-1]], where))
    if not labels:
        raise GlueDataError(f"{path}: no examples.")
    dtype = np.float32 if task.is_regression else np.int32
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, np.asarray(labels, dtype))


def load_tsv_splits(task: GlueTask, data_dir: str) -> tuple[Examples, list[Examples]]:
    """The training split and every dev split of ``task`` from a GLUE folder.

    All paths are checked before anything is read, so a missing dev file is reported at once.
    """
    paths = [
        split_path(task, data_dir, f) for f in ("train.tsv", *(d.filename for d in task.dev_sets))
    ]
    train, *dev = (read_tsv(task, p) for p in paths)
    return train, dev


def read_test_tsv(task: GlueTask, path: str) -> tuple[list[str], Examples]:
    """The ids (the ``index`` column; QQP: ``id``) and texts of a GLUE test file (a header line,
    no labels); the labels are placeholders."""
    lines = _lines(path)
    header = lines[0].split("\t") if lines else []
    id_column = next((c for c in ("index", "id") if c in header), None)
    missing = [c for c in task.text_columns if c not in header] + ([] if id_column else ["index"])
    if missing:
        raise GlueDataError(f"{path}:1: header {header} lacks column(s) {missing}.")
    index = [header.index(c) for c in (id_column, *task.text_columns)]
    rows = [
        split_row(line, len(header), f"{path}:{lineno}", GlueDataError)
        for lineno, line in enumerate(lines[1:], start=2)
    ]
    if not rows:
        raise GlueDataError(f"{path}: no examples.")
    ids, *texts = ([row[i] for row in rows] for i in index)
    text_b = texts[1] if len(texts) > 1 else None
    return ids, Examples(texts[0], text_b, np.zeros(len(ids), np.int32))


def load_hub_test_splits(task: GlueTask) -> list[TestSplit]:
    """The test splits of ``task`` in ``nyu-mll/glue`` (ids: its ``idx`` column)."""
    ds, columns = _hub_dataset(task), task.hub_text_columns or task.text_columns
    splits = []
    for test in task.tests():
        if test.hub_split in ds:
            d = ds[test.hub_split]
            text_b = list(d[columns[1]]) if len(columns) > 1 else None
            examples = Examples(list(d[columns[0]]), text_b, np.zeros(len(d), np.int32))
            splits.append(
                TestSplit(test.name, [str(i) for i in d["idx"]], examples, test.submission)
            )
    return splits


def load_test_splits(task: GlueTask, data_dir: str | None) -> list[TestSplit]:
    """The test splits of ``task`` whose files are in the GLUE folder ``data_dir``, or on the hub
    if it is empty."""
    if not data_dir:
        return load_hub_test_splits(task)
    splits = []
    for test in task.tests():
        path = os.path.normpath(os.path.join(data_dir, task.folder, test.filename))
        if os.path.isfile(path):
            ids, examples = read_test_tsv(task, path)
            splits.append(TestSplit(test.name, ids, examples, test.submission))
    return splits


def hub_resolves(host: str | None) -> bool:
    """Whether ``host`` has an address (no network: fail at once, not after the hub's retries)."""
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _hub_dataset(task: GlueTask) -> datasets.DatasetDict:
    """``nyu-mll/glue``'s copy of ``task``, or one line saying why it cannot be loaded."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if not offline and not hub_resolves(host):
        raise GlueDataError(
            f"Cannot reach the hub ({host}) to load {HUB_DATASET}/{task.name}: set "
            "--config.data_dir to a folder of the original GLUE files (or HF_HUB_OFFLINE=1 to "
            "use a cached copy)."
        )
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, hub errors: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlueDataError(
            f"Cannot load {HUB_DATASET}/{task.name} from the hub ({reason}); without network, "
            "set --config.data_dir to a folder of the original GLUE files."
        ) from e
    return ds


def load_hub_splits(task: GlueTask) -> tuple[Examples, list[Examples]]:
    """The training split and every dev split of ``task`` from the ``nyu-mll/glue`` hub dataset."""
    ds = _hub_dataset(task)
    columns = task.hub_text_columns or task.text_columns
    if not task.is_regression:
        names = ds["train"].features["label"].names
        if len(names) != len(task.labels):
            raise GlueDataError(
                f"{HUB_DATASET}/{task.name} has labels {names}; "
                f"expected {len(task.labels)} classes."
            )

    def convert(split: str) -> Examples:
        d = ds[split]
        labels = np.asarray(d["label"], np.float32 if task.is_regression else np.int32)
        if not task.is_regression and ((labels < 0) | (labels >= task.num_labels)).any():
            raise GlueDataError(f"{HUB_DATASET}/{task.name}[{split}] has unlabelled examples.")
        text_b = list(d[columns[1]]) if len(columns) > 1 else None
        return Examples(list(d[columns[0]]), text_b, labels)

    return convert("train"), [convert(s.hub_split) for s in task.dev_sets]


def load_splits(task: GlueTask, data_dir: str | None) -> tuple[Examples, list[Examples]]:
    """``task``'s training and dev splits from ``data_dir``, or from the hub if it is empty."""
    return load_tsv_splits(task, data_dir) if data_dir else load_hub_splits(task)
