"""What a run writes besides checkpoints: ``metrics.jsonl`` lines, TensorBoard scalars, JSON.

In a multi-process run only process 0 writes them (:func:`is_writer`); elsewhere they do nothing.
Whole files are written to a temporary name and renamed, so a run killed at any moment leaves
either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tensorboardX import SummaryWriter

from childtuning_trainer.distributed import is_writer


def replace_file(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (a temporary file, flushed, then renamed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _complete_lines(path: str) -> list[str]:
    """The lines of ``path`` up to the first that is not a whole JSON record (a kill can cut the
    last one short)."""
    lines = []
    with open(path) as f:
        for line in f:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n"):
                break
            lines.append(line)
    return lines


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl``; on resume drops lines past ``step``
    (and a line a kill cut short)."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.enabled = is_writer()
        if not self.enabled:
            return
        lines = []
        if resume_step and os.path.exists(path):
            lines = [
                line for line in _complete_lines(path) if json.loads(line)["step"] <= resume_step
            ]
        replace_file(path, "".join(lines))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (process 0 only, atomically)."""
    if is_writer():
        replace_file(path, json.dumps(obj, indent=2) + "\n")


class TensorBoard:
    """TensorBoard scalars (``tensorboardX``), written by process 0 only, as Flax's examples do.

    On resume, ``purge_step`` tells TensorBoard to drop the events a killed run wrote past the
    checkpoint it resumes from.
    """

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled and is_writer():
            self.writer = SummaryWriter(log_dir, purge_step=purge_step or None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
