"""Per-example predictions: ``output_dir/predictions/<split>.tsv`` and GLUE's submission files.

Every dev set gets ``predictions/<split>.tsv`` (``dev.tsv``; MNLI: ``dev_matched.tsv`` and
``dev_mismatched.tsv``) with one row per example: its 0-based position in the dev file, the
prediction (a label name as the task's files write it, or the regression output) and the gold
label. A test set the task can read (``load_test_splits``; GLUE: ``test.tsv`` in the data folder)
gets ``predictions/<split>.tsv`` with the file's own ``index`` and the prediction, and, for GLUE,
``predictions/glue_submission/<Task>.tsv`` in the format the GLUE server takes (header
``index<TAB>prediction``; label names as in the task's files; STS-B clipped to [0, 5]). Every
process computes the outputs; process 0 writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from childtuning_trainer import distributed, input_pipeline, outputs, steps
from childtuning_trainer.tasks import Task, TestSplit
from childtuning_trainer.tasks import metrics as task_metrics
from childtuning_trainer.tokenization import tokenize

PREDICTIONS_DIR = "predictions"
SUBMISSION_DIR = "glue_submission"
STSB_RANGE = (0.0, 5.0)  # GLUE's STS-B scores


def split_name(name: str) -> str:
    """The predictions file's stem for an evaluation set called ``name`` (``dev.tsv`` -> dev)."""
    return os.path.splitext(os.path.basename(name))[0]


def prediction_strings(task: Task, logits: np.ndarray, clip: tuple[float, float] | None = None):
    """The predictions as the task's files write labels: a label name, or a number."""
    preds = task_metrics.predictions(task, logits)
    if task.is_regression:
        values = preds if clip is None else np.clip(preds, *clip)
        return [f"{v:.6f}" for v in values]
    return [task.labels[int(i)] for i in preds]


def _label_strings(task: Task, labels: np.ndarray) -> list[str]:
    if task.is_regression:
        return [f"{v:g}" for v in labels]
    return [task.labels[int(i)] for i in labels]


def write_table(path: str, header: Sequence[str], columns: Sequence[Sequence[str]]) -> None:
    """A tab-separated file with ``header`` and one row per entry of the ``columns``."""
    rows = ["\t".join(header), *("\t".join(row) for row in zip(*columns, strict=True))]
    outputs.replace_file(path, "\n".join(rows) + "\n")


def tokenized_tests(task: Task, data_dir: str, tokenizer: Any, length: int):
    """``[(split, features)]`` of every test split the task finds in ``data_dir``."""
    load = getattr(task, "load_test_splits", None)
    splits: list[TestSplit] = load(data_dir or None) if load else []
    return [(s, tokenize(s.examples, tokenizer, length)) for s in splits]


def write_predictions(
    output_dir: str,
    task: Task,
    logits_of: Callable[[dict], np.ndarray],
    dev: Sequence[dict],
    tests: Sequence[tuple[TestSplit, dict]],
) -> list[str]:
    """Writes the predictions of every dev and test set; returns the files (relative paths).

    ``logits_of(features)`` gives the model's outputs for a set's features (every process must
    call it: the evaluation step spans them); ``dev`` parallels ``task.dev_sets``.
    """
    folder = os.path.join(output_dir, PREDICTIONS_DIR)
    tables: list[tuple[str, tuple[str, ...], list[list[str]]]] = []
    for dev_set, features in zip(task.dev_sets, dev, strict=True):
        labels = features["labels"]
        preds = prediction_strings(task, logits_of(features))
        positions = [str(i) for i in range(len(labels))]
        columns = [positions, preds, _label_strings(task, labels)]
        tables.append(
            (f"{split_name(dev_set.name)}.tsv", ("index", "prediction", "label"), columns)
        )
    for split, features in tests:
        logits = logits_of(features)
        preds = prediction_strings(task, logits)
        tables.append((f"{split.name}.tsv", ("index", "prediction"), [split.ids, preds]))
        if split.submission:
            clipped = prediction_strings(task, logits, STSB_RANGE if task.is_regression else None)
            path = os.path.join(SUBMISSION_DIR, split.submission)
            tables.append((path, ("index", "prediction"), [split.ids, clipped]))
    if distributed.is_writer():
        os.makedirs(os.path.join(folder, SUBMISSION_DIR), exist_ok=True)
        for path, header, columns in tables:
            write_table(os.path.join(folder, path), header, columns)
        if not any(SUBMISSION_DIR in path for path, _, _ in tables):
            os.rmdir(os.path.join(folder, SUBMISSION_DIR))
    return [os.path.join(PREDICTIONS_DIR, path) for path, _, _ in tables]


def logits_function(
    p_eval_step: Callable,
    params: Any,
    devices: Sequence[jax.Device],
    batch_size: int,
    padding: input_pipeline.Padding | None,
) -> Callable[[dict], np.ndarray]:
    """``logits_of(features)`` for the replicated ``params`` (:func:`steps.eval_outputs`)."""
    return lambda features: steps.eval_outputs(
        p_eval_step, params, features, devices, batch_size, padding
    )
