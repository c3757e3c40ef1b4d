"""GLUE: the nine tasks, faithful readers of the original TSV files and of ``nyu-mll/glue``."""

from childtuning_trainer.tasks.glue.data import (
    GlueDataError,
    load_hub_splits,
    load_splits,
    load_tsv_splits,
    read_tsv,
)
from childtuning_trainer.tasks.glue.tasks import TASKS, DevSet, GlueTask, get_task

__all__ = [
    "TASKS",
    "DevSet",
    "GlueDataError",
    "GlueTask",
    "get_task",
    "load_hub_splits",
    "load_splits",
    "load_tsv_splits",
    "read_tsv",
]
