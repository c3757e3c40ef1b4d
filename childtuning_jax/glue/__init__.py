"""GLUE for Child-Tuning: task definitions, faithful TSV and hub readers, tokenisation, metrics.

Library code only; the training loop is ``train.py`` at the repository root.
"""

from childtuning_jax.glue.data import (
    Examples,
    GlueDataError,
    load_hub_splits,
    load_splits,
    load_tsv_splits,
    read_tsv,
)
from childtuning_jax.glue.metrics import compute_metrics, predictions
from childtuning_jax.glue.tasks import TASKS, DevSet, GlueTask, get_task
from childtuning_jax.glue.tokenization import tokenize

__all__ = [
    "TASKS",
    "DevSet",
    "Examples",
    "GlueDataError",
    "GlueTask",
    "compute_metrics",
    "get_task",
    "load_hub_splits",
    "load_splits",
    "load_tsv_splits",
    "predictions",
    "read_tsv",
    "tokenize",
]
