"""Metrics under GLUE's names, computed with scikit-learn and SciPy; any task may list them.

CoLA: ``matthews_correlation``; MRPC and QQP: ``accuracy`` and ``f1`` (of the positive class);
STS-B: ``pearson`` and ``spearmanr``; every other task: ``accuracy``. Your own data
(``tasks.own_data``) adds ``macro_f1``: the unweighted mean of every class's F1.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from childtuning_trainer.tasks.base import Task


def predictions(task: Task, logits: np.ndarray) -> np.ndarray:
    """Predicted label ids (argmax), or the regression output itself, from model outputs."""
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
    return logits.argmax(axis=-1)


def compute_metrics(task: Task, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics of ``task`` for predictions ``preds`` (see :func:`predictions`)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels.")
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "matthews_correlation":
            value = skm.matthews_corrcoef(labels, preds)
        elif name == "accuracy":
            value = skm.accuracy_score(labels, preds)
        elif name == "f1":
            value = skm.f1_score(labels, preds)
        elif name == "macro_f1":
            value = skm.f1_score(labels, preds, average="macro", labels=range(task.num_labels))
        elif name == "pearson":
            value = stats.pearsonr(preds, labels)[0]
        elif name == "spearmanr":
            value = stats.spearmanr(preds, labels)[0]
        else:
            raise ValueError(f"Unknown GLUE metric {name!r}.")
        out[name] = float(value)
    return out


def best_epoch(history: list[dict], task: Task) -> dict:
    """The epoch of ``history`` (``{"epoch", "eval"}`` entries) with the highest first metric of
    the task (the earliest among ties)."""
    key = task.metrics[0]
    return max(history, key=lambda h: (h["eval"][key], -h["epoch"]))


def trivial_baseline(
    task: Task, train_labels: np.ndarray, dev_labels: np.ndarray
) -> tuple[str, dict[str, float]]:
    """The metrics of the trivial predictor a fine-tuned model has to beat, and its description.

    Classification: the training set's majority class for every dev example. Regression: the
    training mean for every example; a constant has no correlation, scored 0.
    """
    train_labels, dev_labels = np.asarray(train_labels), np.asarray(dev_labels)
    if task.is_regression:
        mean = float(train_labels.mean())
        scores = {name: 0.0 for name in task.metrics if name in ("pearson", "spearmanr")}
        return f"a constant prediction (the training mean {mean:.3g})", scores
    majority = int(np.bincount(train_labels.astype(np.int64), minlength=task.num_labels).argmax())
    preds = np.full(len(dev_labels), majority)
    with np.errstate(all="ignore"):
        scores = compute_metrics(task, preds, dev_labels)
    name = task.labels[majority] if task.labels else str(majority)
    return f"the majority class ({name!r}) for every example", scores
