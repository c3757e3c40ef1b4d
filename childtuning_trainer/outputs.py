"""What a run writes besides checkpoints: ``metrics.jsonl`` lines, TensorBoard scalars, JSON,
and the progress bar (:class:`TrainingLog` drives all three during training).

In a multi-process run only process 0 writes them (:func:`is_writer`); elsewhere they do nothing.
Whole files are written to a temporary name and renamed, so a run killed at any moment leaves
either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

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


class TrainingLog:
    """The training loop's reporting: a ``metrics.jsonl`` line and TensorBoard scalars per
    interval (the mean loss since the last line, the time per step), the progress bar, and each
    evaluation.

    ``interval_losses`` are the losses since the last line (a resumed run's, from its checkpoint);
    ``kept_fraction`` (if known) is logged with every interval.
    """

    def __init__(
        self,
        output_dir: str,
        tensorboard: bool,
        *,
        step: int,
        total_steps: int,
        desc: str,
        interval_losses: list[float],
        kept_fraction: float | None,
    ):
        self.metrics = MetricsLog(os.path.join(output_dir, "metrics.jsonl"), step)
        self.board = TensorBoard(os.path.join(output_dir, "tensorboard"), tensorboard, step)
        self.bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step")
        self.interval_losses = interval_losses
        self.kept_fraction = kept_fraction
        self.restart(step)

    def restart(self, step: int) -> None:
        """The next interval's step time is counted from now (e.g. not counting evaluation)."""
        self.last = (step, time.perf_counter())

    def steps(self, losses: list[float], learning_rate: float) -> None:
        """Training steps done (their losses, fetched in one block); ``learning_rate``: the
        last one's."""
        self.interval_losses.extend(losses)
        self.bar.update(len(losses))
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{learning_rate:.2e}")

    def interval(self, step: int, epoch: int, learning_rate: float, grad_norm: float) -> None:
        """Writes the line of the interval ending at ``step`` (of 1-based ``epoch``)."""
        record = {"step": step, "epoch": epoch, "loss": float(np.mean(self.interval_losses))}
        record.update(learning_rate=learning_rate, grad_norm=grad_norm)
        self.metrics.write(record)
        now = time.perf_counter()
        scalars = {f"train/{k}": record[k] for k in ("loss", "learning_rate", "grad_norm")}
        scalars["train/step_time_s"] = (now - self.last[1]) / (step - self.last[0])
        if self.kept_fraction is not None:
            scalars["train/kept_fraction"] = self.kept_fraction
        self.board.write(step, scalars)
        self.last = (step, now)
        self.interval_losses = []

    def evaluation(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Writes the dev metrics after 1-based ``epoch``."""
        self.metrics.write({"step": step, "epoch": epoch, "eval": metrics})
        self.board.write(step, {f"eval/{name}": value for name, value in metrics.items()})
        self.bar.write(f"epoch {epoch}: {json.dumps(metrics)}")

    def close(self) -> None:
        self.bar.close()
        self.board.close()
