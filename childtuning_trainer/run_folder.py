"""The run's ``output_dir``: a run never writes over another run's files unless told to.

- A folder that holds any file is refused unless ``config.resume`` (continue the run there) or
  ``config.overwrite`` (replace it) is set; ``output_dir`` naming a file is refused too.
- ``overwrite`` deletes the files a run writes (:data:`RUN_FILES`) and leaves any other file.
- A run group's folder (:mod:`childtuning_trainer.group_setup`) is claimed the same way, with
  its own files (:data:`GROUP_FILES`), before each of its runs' folders.
- ``resume`` on a finished run (a ``results.json`` and no checkpoint left, e.g. after the sweep
  deleted them) does nothing: :func:`finished_results` returns its results.

In a multi-process run every process checks before any of them writes there (a barrier), and
process 0 deletes before the others go on (another).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
from jax.experimental import multihost_utils

from childtuning_trainer import checkpoints
from childtuning_trainer.distributed import is_writer

if TYPE_CHECKING:
    from childtuning_trainer.settings import OutputSettings, Settings

# What a run writes into output_dir (``overwrite`` deletes these and nothing else).
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "results.json",
    "params.msgpack",
    "mask_summary.json",
    "tensorboard",
    "model",
    "predictions",
)
GROUP_FILES = ("checkpoints",)  # what a run group writes into its own folder besides its runs'


def has_checkpoint(output_dir: str) -> bool:
    """Whether ``output_dir/checkpoints`` holds a committed checkpoint (a ``<step>`` folder)."""
    path = os.path.join(output_dir, "checkpoints")
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def finished_results(settings: Settings) -> dict | None:
    """With ``resume``: the ``results.json`` of a finished run with no checkpoint left, else
    ``None`` (a run with checkpoints resumes from them, as a run that scores new extra sets).

    Raises:
      ValueError: the finished run differs from this one in a setting a resume must keep.
    """
    output_dir = settings.outputs.output_dir
    path = os.path.join(output_dir, "results.json")
    if not settings.outputs.resume or not os.path.isfile(path) or has_checkpoint(output_dir):
        return None
    with open(path) as f:
        results = json.load(f)
    saved, config = results.get("config", {}), settings.config
    for key in checkpoints.RESUME_KEYS:
        value = saved.get(key, checkpoints.LEGACY_VALUES.get(key))
        if value != config[key]:
            raise ValueError(
                f"config.output_dir={output_dir!r} holds a finished run with {key}={value!r}, "
                f"this run {key}={config[key]!r}; set --config.overwrite=true to replace it."
            )
    return results


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def holds_files(path: str) -> bool:
    """Whether ``path`` is a file, or a folder with a file somewhere below it (a folder of empty
    folders, as a run that stopped before its first checkpoint leaves, holds nothing)."""
    return not os.path.isdir(path) or any(files for _, _, files in os.walk(path))


def check(outputs: OutputSettings, kind: str = "run") -> list[str]:
    """What ``output_dir`` holds, refused unless ``resume`` or ``overwrite`` (see the module
    docstring); ``kind``: what continues there (a run, a group).

    Raises:
      ValueError: one line naming ``output_dir`` and the settings that allow it.
    """
    output_dir = outputs.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"config.output_dir={output_dir!r} is a file; name a folder.")
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    held = [name for name in names if holds_files(os.path.join(output_dir, name))]
    if held and not (outputs.resume or outputs.overwrite):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(
            f"config.output_dir={output_dir!r} is not empty ({shown}); set "
            f"--config.resume=true to continue the {kind} there, --config.overwrite=true to "
            "replace it, or choose another output_dir."
        )
    return held


def claim(outputs: OutputSettings, own_files: Sequence[str] = RUN_FILES, kind: str = "run") -> None:
    """Makes ``output_dir`` the run's (or the group's: ``kind``, ``own_files``): refuses another
    run's folder (:func:`check`), deletes ``own_files`` there with ``overwrite``, creates it if
    missing.

    Raises:
      ValueError: one line naming ``output_dir`` and the settings that allow it.
    """
    output_dir = outputs.output_dir
    held = check(outputs, kind)
    _sync("output_dir_checked")  # every process has looked before any writes to it
    if outputs.overwrite and held:
        if is_writer():
            for name in own_files:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        _sync("overwrite_done")
    os.makedirs(output_dir, exist_ok=True)
