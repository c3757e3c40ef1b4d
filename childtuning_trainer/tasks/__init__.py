"""The task registry: every task the trainer can fine-tune on, by name.

A family of tasks registers each of its tasks with :func:`register`; the trainer only ever calls
:func:`get_task`. GLUE's nine tasks and the NLI tasks (``snli``, ``mnli_m``, ``sick``) are
registered here. ``csv`` and ``jsonl`` (your own files, :mod:`.own_data`) are built from the
settings instead (``settings.task_of``).
"""

from __future__ import annotations

from childtuning_trainer.tasks import glue, nli
from childtuning_trainer.tasks.base import DataError, EvalSet, Examples, Task, TestSplit

_REGISTRY: dict[str, Task] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "")


def register(task: Task) -> Task:
    """Adds ``task`` under its name (case-insensitive, ``-`` ignored); a taken name is an error."""
    key = _key(task.name)
    if key in _REGISTRY and _REGISTRY[key] is not task:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    _REGISTRY[key] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive; ``sst-2`` and ``sts-b`` are accepted too)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown task {name!r}; expected one of {', '.join(_REGISTRY)}, "
            "or csv / jsonl for your own files."
        )
    return _REGISTRY[key]


def task_names() -> list[str]:
    return list(_REGISTRY)


for _task in (*glue.TASKS.values(), *nli.TASKS.values()):
    register(_task)

__all__ = [
    "DataError",
    "EvalSet",
    "Examples",
    "Task",
    "TestSplit",
    "get_task",
    "register",
    "task_names",
]
