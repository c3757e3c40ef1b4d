"""NLI beyond GLUE: SNLI, MNLI matched and SICK tasks, and readers of NLI JSON-lines files."""

from childtuning_trainer.tasks.nli.data import (
    HUB_EVAL_SETS,
    LABELS_2,
    LABELS_3,
    NliDataError,
    fixed_split,
    is_sick_file,
    load_hub_eval_set,
    load_hub_splits,
    load_local_splits,
    read_jsonl,
    read_sick,
    sick_split,
)
from childtuning_trainer.tasks.nli.tasks import TASKS, DevSet, NliTask

__all__ = [
    "HUB_EVAL_SETS",
    "LABELS_2",
    "LABELS_3",
    "TASKS",
    "DevSet",
    "NliDataError",
    "NliTask",
    "fixed_split",
    "is_sick_file",
    "load_hub_eval_set",
    "load_hub_splits",
    "load_local_splits",
    "read_jsonl",
    "read_sick",
    "sick_split",
]
