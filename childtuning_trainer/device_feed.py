"""What moves between the host and the devices while training, without making either wait.

* :func:`prefetch_to_device`: the next batches are placed on the devices while the current step
  runs (in the style of ``flax.jax_utils.prefetch_to_device``), for both parallel layouts.
* :class:`PendingMetrics`: the steps' metrics stay on the devices and come back in one block
  when the loop needs them (a log line, a checkpoint, the end of an epoch), not after every step:
  converting a device value to a Python number makes the host wait for the device.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from childtuning_trainer import parallel

PREFETCH_BATCHES = 2  # batches placed on the devices ahead of the step that uses them


def prefetch_to_device(
    batches: Iterable[Any],
    devices: Sequence[jax.Device] | parallel.Layout,
    size: int = PREFETCH_BATCHES,
) -> Iterator[Any]:
    """``batches`` (global host batches) split over ``devices`` (:func:`parallel.shard_batch`),
    ``size`` of them placed ahead: a placement is asynchronous, so the copies overlap the steps
    already dispatched."""
    batches = iter(batches)
    queue: collections.deque = collections.deque()

    def enqueue(count: int) -> None:
        for batch in itertools.islice(batches, count):
            queue.append(parallel.shard_batch(batch, devices))

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)


class PendingMetrics:
    """The metrics of the steps since the last :meth:`fetch`, still on the devices."""

    def __init__(self):
        self.pending: list[Any] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, metrics: Any) -> None:
        """One step's metrics (device arrays; nothing waits for them)."""
        self.pending.append(metrics)

    def fetch(self) -> list[dict[str, np.ndarray]]:
        """Every pending step's metrics on the host, in step order (one explicit transfer of the
        block: the copies start together, then the host waits once)."""
        fetched, self.pending = jax.device_get(self.pending), []
        return fetched
