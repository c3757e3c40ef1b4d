"""What a run writes besides checkpoints: ``metrics.jsonl`` lines, TensorBoard scalars, JSON."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from tensorboardX import SummaryWriter


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl``; on resume drops lines past ``step``."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        lines = []
        if resume_step and os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(lines)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class TensorBoard:
    """TensorBoard scalars (``tensorboardX``), written by process 0 only, as Flax's examples do.

    On resume, ``purge_step`` tells TensorBoard to drop the events a killed run wrote past the
    checkpoint it resumes from.
    """

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled and jax.process_index() == 0:
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
