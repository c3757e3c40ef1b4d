"""What the training loop carries from step to step and from checkpoint to resumed run.

:class:`Progress` is a run's bookkeeping besides its arrays: the step, the dev results so far, the
times spent, ChildTuning-D's mask facts, and where the data stream stands. A checkpoint stores it
as JSON (:meth:`Progress.to_json`) next to the state, with the keys checkpoints have always had,
so a run resumes from a checkpoint written before this class existed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass
class Progress:
    """A run's bookkeeping (a checkpoint's ``meta``); see the module docstring.

    Attributes:
      step: the steps taken.
      history: ``{"epoch", "step", "eval"}`` per evaluated epoch.
      fisher_time_s: ChildTuning-D's mask selection time (``None`` for vanilla and F).
      train_time_s, eval_time_s: time spent training and evaluating in this process.
      fisher_source: ``"computed"`` or ``"cache"`` (``None``: a D rule without a Fisher pass).
      d_mask_uniform_leaves: D's all-True or all-False mask leaves (``None``: not D).
      kept_fraction: the share of encoder-layer weights D's mask keeps.
      config: the run's config as a dict (resume compares it); set by the run.
      global_batch_size, num_devices, num_train_examples: the run's shape; set by the run.
      epoch_train_time_s: training time of each finished epoch.
      data_order: where the data stream stands, ``{"seed", "epoch", "batch"}``.
      interval_losses: the training losses since the last log line.
      flat_update: whether the optimizer state is flat (``childtuning_jax.flat_update``); only a
        flat one is written down, so per-leaf meta reads as checkpoints always had it.
    """

    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fisher_time_s: float | None = None
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    fisher_source: str | None = None
    d_mask_uniform_leaves: list[str] | None = None
    kept_fraction: float | None = None
    config: dict[str, Any] | None = None
    global_batch_size: int | None = None
    num_devices: int | None = None
    num_train_examples: int | None = None
    epoch_train_time_s: list[float] = dataclasses.field(default_factory=list)
    data_order: dict[str, int] | None = None
    interval_losses: list[float] = dataclasses.field(default_factory=list)
    flat_update: bool = False

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's JSON: D's mask keys only for a D run, the epoch times once an epoch
        has ended, the data order and losses once a checkpoint is due (as checkpoints had)."""
        out = dataclasses.asdict(self)
        if self.d_mask_uniform_leaves is None:
            for key in _D_KEYS:
                del out[key]
        for key in ("epoch_train_time_s", "data_order", "flat_update"):
            if not out[key]:
                del out[key]
        return out

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> Progress:
        """A checkpoint's ``meta`` (keys it lacks take their defaults; others are ignored)."""
        return cls(**{key: meta[key] for key in _FIELDS if key in meta})


_FIELDS = tuple(field.name for field in dataclasses.fields(Progress))
_D_KEYS = ("fisher_source", "d_mask_uniform_leaves", "kept_fraction")


class EpochClock:
    """One epoch's training time in this process (compiles included), added lap by lap to
    ``progress.train_time_s``; checkpoints and evaluation fall between laps."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.total = 0.0
        self.start = time.perf_counter()

    def lap(self) -> float:
        """Counts the time since the last lap; returns the epoch's time so far."""
        elapsed = time.perf_counter() - self.start
        self.progress.train_time_s += elapsed
        self.total += elapsed
        self.start = time.perf_counter()
        return self.total
