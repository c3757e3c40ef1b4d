"""Where a task's files are read from: ``config.data_dir`` when set, else the folder under the
environment variable ``CHILDTUNING_DATA_DIR`` that holds the task's folder, else the hub.

``$CHILDTUNING_DATA_DIR`` may hold the task folders themselves (``RTE/``, ``snli/``, ...) or a
``glue/`` and an ``nli/`` folder holding them; a task it does not hold (say ``SST-2/``) is read
from the hub.
"""

from __future__ import annotations

import os

from childtuning_trainer import tasks

ENV_VAR = "CHILDTUNING_DATA_DIR"
SUBFOLDERS = ("", "glue", "nli")


def data_root() -> str:
    """``$CHILDTUNING_DATA_DIR`` ("" when unset).

    Raises:
      ValueError: it is set but names no folder.
    """
    root = os.environ.get(ENV_VAR, "")
    if root and not os.path.isdir(root):
        raise ValueError(f"{ENV_VAR}={root!r} is not a folder.")
    return root


OWN_FILES = ("csv", "jsonl")  # tasks.own_data's formats


def task_data_dir(task_name: str, data_dir: str = "") -> str:
    """``data_dir`` when set; else the first of ``$CHILDTUNING_DATA_DIR``, its ``glue/`` and its
    ``nli/`` that holds ``task_name``'s folder; else "" (the hub)."""
    if data_dir or task_name.lower() in OWN_FILES:  # your own files name their paths
        return data_dir
    root = data_root()
    folder = getattr(tasks.get_task(task_name), "folder", None)
    if not root or not folder:
        return ""
    for sub in SUBFOLDERS:
        if os.path.isdir(os.path.join(root, sub, folder)):
            return os.path.join(root, sub) if sub else root
    return ""
