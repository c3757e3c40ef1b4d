"""The input pipeline: load a task's splits, subset, tokenise, and cut into batches.

Every batch has exactly the global batch size. A short last batch is filled up with copies of its
first example whose ``weights`` are 0: training then averages the loss over the real examples only
(nothing is dropped, as in the Hugging Face Trainer), and evaluation scores every dev example
exactly once.

Sequences are tokenised to ``max_seq_length``; with ``padding="bucket"`` each batch is then cut to
the smallest of a few bucket lengths that holds its longest example, on the tokenizer's padding
side. The bucket lengths are fitted to the run (:func:`fit_buckets`): at most ``max_buckets``
multiples of ``bucket_multiple`` that minimise the padded positions of the run's training and dev
batches, each used by at least ``bucket_min_share`` of them, then ``max_seq_length`` for anything
longer (``max_buckets=0``: every multiple). Only padding is removed, so the examples, their order
and truncation are those of ``padding="max_length"``, and the steps compile once per bucket
instead of once.

The order of the training examples in epoch ``e`` is a pure function of ``(seed, e)``, so a resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from childtuning_trainer.tasks import Examples, Task
from childtuning_trainer.tokenization import tokenize

if TYPE_CHECKING:
    from childtuning_trainer.settings import DataSettings

Batch = dict[str, np.ndarray]


PADDINGS = ("bucket", "max_length")
SEQUENCE_FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def bucket_lengths(max_seq_length: int, multiple: int) -> tuple[int, ...]:
    """Multiples of ``multiple`` below ``max_seq_length``, then ``max_seq_length`` itself."""
    return (*range(multiple, max_seq_length, multiple), max_seq_length)


class Padding(NamedTuple):
    """How far a batch is padded: to the smallest of ``buckets`` that holds its longest example.

    ``side`` is the tokenizer's padding side: ``right`` keeps the first positions, ``left`` (XLNet)
    the last ones. ``buckets=(max_seq_length,)`` pads every batch to the maximum.
    """

    buckets: tuple[int, ...]
    side: str = "right"

    def length(self, batch: Batch) -> int:
        """The bucket length for ``batch``."""
        longest = int(batch["attention_mask"].sum(axis=1).max())
        return next((b for b in self.buckets if b >= longest), self.buckets[-1])

    def trim(self, batch: Batch) -> Batch:
        """``batch`` with its sequence features cut to :meth:`length` positions."""
        length = self.length(batch)
        cut = slice(-length, None) if self.side == "left" else slice(0, length)
        return {k: v[:, cut] if k in SEQUENCE_FEATURES else v for k, v in batch.items()}


class TaskData(NamedTuple):
    """Tokenised training and dev sets of one task (``dev`` parallels ``task.dev_sets``), and how
    their batches are padded."""

    task: Task
    train: Batch
    dev: list[Batch]
    padding: Padding | None = None

    @property
    def num_train_examples(self) -> int:
        return len(self.train["labels"])


def subset_indices(num_examples: int, max_samples: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``max_samples`` example indices, in file order (all if <= 0)."""
    if max_samples <= 0 or max_samples >= num_examples:
        return np.arange(num_examples)
    chosen = np.random.default_rng(seed).choice(num_examples, max_samples, replace=False)
    return np.sort(chosen)


def load_examples(settings: DataSettings, seed: int, task: Task) -> tuple[Examples, list[Examples]]:
    """Reads (and subsets) the task's training and dev examples, before any tokenisation."""
    train, dev = task.load_splits(settings.data_dir or None)
    train = train.select(subset_indices(len(train), settings.max_train_samples, seed))
    if settings.max_eval_samples > 0:
        dev = [d.select(np.arange(min(len(d), settings.max_eval_samples))) for d in dev]
    return train, dev


def tokenize_all(
    train: Examples,
    dev: list[Examples],
    task: Task,
    tokenizer: Any,
    length: int,
    padding: Padding | None = None,
) -> TaskData:
    """Tokenises every split to ``length`` tokens; batches will be cut as ``padding`` says."""
    return TaskData(
        task,
        tokenize(train, tokenizer, length),
        [tokenize(d, tokenizer, length) for d in dev],
        padding,
    )


TRAIN_STREAM, FISHER_STREAM = 0, 1


def epoch_order(seed: int, epoch: int, num_examples: int, stream: int = TRAIN_STREAM) -> np.ndarray:
    """The order of the examples in ``epoch``: a permutation seeded by (seed, stream, epoch).

    ``stream`` separates the training epochs from the Fisher pass (``FISHER_STREAM``).
    """
    return np.random.default_rng([seed, stream, epoch]).permutation(num_examples)


def fisher_order(num_examples: int, max_samples: int, seed: int) -> np.ndarray:
    """The Fisher pass's examples in order: a seeded subset of at most ``max_samples`` (all if
    <= 0), shuffled in its own stream (``FISHER_STREAM``)."""
    indices = subset_indices(num_examples, max_samples, seed)
    return indices[epoch_order(seed, 0, len(indices), FISHER_STREAM)]


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def take(
    features: Batch, indices: np.ndarray, batch_size: int, padding: Padding | None = None
) -> Batch:
    """The examples at ``indices`` as one batch of ``batch_size`` rows, with 0/1 ``weights``.

    Missing rows are copies of the first example (real tokens, so no fully masked sequence) with
    weight 0. ``padding`` cuts the sequence axis to the batch's bucket.
    """
    num_real = len(indices)
    padded = np.concatenate([indices, np.full(batch_size - num_real, indices[0])])
    batch = {k: v[padded] for k, v in features.items()}
    batch["weights"] = (np.arange(batch_size) < num_real).astype(np.float32)
    return padding.trim(batch) if padding is not None else batch


def train_batches(
    features: Batch,
    order: np.ndarray,
    batch_size: int,
    start: int = 0,
    padding: Padding | None = None,
) -> Iterator[Batch]:
    """The batches of one epoch in ``order``, from batch index ``start`` on."""
    for i in range(start, num_batches(len(order), batch_size)):
        yield take(features, order[i * batch_size : (i + 1) * batch_size], batch_size, padding)


def eval_batches(
    features: Batch, batch_size: int, padding: Padding | None = None
) -> Iterator[Batch]:
    """Every example of a dev set once, in file order."""
    order = np.arange(len(features["labels"]))
    return train_batches(features, order, batch_size, padding=padding)


def fisher_batches(
    features: Batch,
    order: np.ndarray,
    batch_size: int,
    num_devices: int,
    padding: Padding | None = None,
) -> Iterator[Batch]:
    """Batches for the Fisher pass, padded like training batches, for a summed loss.

    ``weights`` are ``num_devices / n_real`` on real rows and 0 on padding, so that
    ``sum(weights * loss)`` on each device, averaged over the devices (as ``fisher_information``
    does), is the mean loss over the batch's real examples: a short last batch keeps its own
    mean, as in the official code, without a compilation of its own for its row count.
    """
    for batch in train_batches(features, order, batch_size, padding=padding):
        batch["weights"] *= num_devices / batch["weights"].sum()
        yield batch


def fit_buckets(
    batch_lengths: np.ndarray,
    max_seq_length: int,
    multiple: int,
    max_buckets: int,
    min_share: float = 0.0,
) -> tuple[int, ...]:
    """At most ``max_buckets`` bucket lengths that pad ``batch_lengths`` to the fewest positions.

    Each batch's longest example is rounded up to a multiple of ``multiple`` (at most
    ``max_seq_length``); a dynamic programme over the sorted distinct values then groups them into
    contiguous runs, each padded to its largest value, minimising the total length. Every bucket
    must hold at least ``min_share`` of the batches (a rarely used shape costs a compile for little
    saving); ties go to fewer buckets. ``max_seq_length`` is appended if missing, so any batch fits.
    """
    rounded = np.minimum(-(-np.asarray(batch_lengths) // multiple) * multiple, max_seq_length)
    values, counts = np.unique(rounded, return_counts=True)
    if len(values) == 0:
        return (max_seq_length,)
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    floor = min_share * cumulative[-1]
    # cost[g][j]: least total length of values[: j + 1] in g buckets, the last ending at values[j].
    cost: list[dict[int, tuple[int, int | None]]] = [{}]
    for j in range(len(values)):
        if cumulative[j + 1] >= floor:
            cost[0][j] = (int(values[j] * cumulative[j + 1]), None)
    for _ in range(1, max_buckets):
        previous, current = cost[-1], {}
        for j in range(len(values)):
            for i, (before, _) in previous.items():
                held = cumulative[j + 1] - cumulative[i + 1]
                if i < j and held >= floor:
                    total = before + int(values[j] * held)
                    if j not in current or total < current[j][0]:
                        current[j] = (total, i)
        cost.append(current)
    last = len(values) - 1
    groups = min(
        (g for g in range(len(cost)) if last in cost[g]), key=lambda g: (cost[g][last][0], g)
    )
    buckets, j = [], last
    for g in range(groups, -1, -1):
        buckets.append(int(values[j]))
        j = cost[g][j][1]
    buckets.reverse()
    return tuple(buckets) if buckets[-1] == max_seq_length else (*buckets, max_seq_length)


def batch_lengths(features: Batch, order: np.ndarray, batch_size: int) -> np.ndarray:
    """The longest example (in real tokens) of each batch of ``features`` taken in ``order``."""
    lengths = features["attention_mask"].sum(axis=1)[order].astype(np.int64)
    return np.maximum.reduceat(lengths, np.arange(0, len(order), batch_size))


def make_padding(
    settings: DataSettings,
    tokenizer: Any,
    data: TaskData,
    batch_size: int,
    *,
    seed: int,
    epochs: int,
) -> Padding:
    """The run's :class:`Padding` from ``settings.padding`` and the tokenizer's padding side.

    With ``settings.max_buckets > 0`` the buckets are fitted to ``data``'s batches of
    ``batch_size``: the training batches of every epoch (their order, from ``seed``, is known in
    advance) and the dev batches.
    """
    side = getattr(tokenizer, "padding_side", "right")
    max_length = settings.max_seq_length
    if settings.padding == "max_length":
        return Padding((max_length,), side)
    if settings.max_buckets <= 0:
        return Padding(bucket_lengths(max_length, settings.bucket_multiple), side)
    lengths = [
        batch_lengths(data.train, epoch_order(seed, e, data.num_train_examples), batch_size)
        for e in range(epochs)
    ]
    lengths += [batch_lengths(d, np.arange(len(d["labels"])), batch_size) for d in data.dev]
    buckets = fit_buckets(
        np.concatenate(lengths),
        max_length,
        settings.bucket_multiple,
        settings.max_buckets,
        settings.bucket_min_share,
    )
    return Padding(buckets, side)
