"""The train, eval and Fisher steps, written per device and mapped over the data axis by the
caller (:mod:`childtuning_trainer.parallel`); the Fisher step is the library's."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import fisher_mean, fisher_step
from childtuning_trainer import distributed, input_pipeline, parallel
from childtuning_trainer.objective import Model, Objective
from childtuning_trainer.tasks import metrics as task_metrics


class TrainState(NamedTuple):
    """Everything that changes during training (replicated over devices while training)."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    dropout: bool,
    axis_name: str | None = parallel.AXIS,
) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)``, run per device on the data axis.

    The loss is the mean over the real (weight 1) examples of the whole global batch: per-device
    sums and counts are summed over the axis, so a short last batch, and any number of devices,
    give the gradient of the same mean. Each device folds its index into ``rng`` for its own
    dropout. ``axis_name=None``: a step on one whole batch, with no axis (e.g. under ``jax.jit``).
    """

    def step(state: TrainState, batch: dict, rng: jax.Array):
        if dropout and axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        rng = rng if dropout else None
        weights = batch["weights"]

        def loss_sum(params):
            return jnp.sum(objective(params, batch, rng) * weights)

        local_loss, local_grads = jax.value_and_grad(loss_sum)(state.params)
        count, loss, grads = jnp.sum(weights), local_loss, local_grads
        if axis_name is not None:
            count, loss, grads = jax.lax.psum((count, loss, grads), axis_name)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / count, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(model: Model) -> Callable:
    """``step(params, batch) -> logits`` (no dropout), run per device."""
    return lambda params, batch: model.apply(params, batch, dropout_rng=None)


def eval_outputs(
    p_eval_step: Callable,
    params: Any,
    features: input_pipeline.Batch,
    devices: Sequence[jax.Device],
    batch_size: int,
    padding: input_pipeline.Padding | None,
) -> np.ndarray:
    """The model's outputs (logits) for every example of ``features``, in order."""
    outputs = []
    for batch in input_pipeline.eval_batches(features, batch_size, padding):
        weights = batch.pop("weights")
        logits = np.asarray(p_eval_step(params, parallel.shard_batch(batch, devices)))
        outputs.append(logits.reshape(batch_size, -1)[weights > 0])
    return np.concatenate(outputs)


def evaluate(
    p_eval_step: Callable,
    params: Any,
    data: input_pipeline.TaskData,
    devices: Sequence[jax.Device],
    batch_size: int,
) -> dict[str, float]:
    """The task's metrics on every evaluation set (each set's suffix ends its metric names)."""
    metrics: dict[str, float] = {}
    for dev_set, features in zip(data.task.dev_sets, data.dev, strict=True):
        logits = eval_outputs(p_eval_step, params, features, devices, batch_size, data.padding)
        preds = task_metrics.predictions(data.task, logits)
        scores = task_metrics.compute_metrics(data.task, preds, features["labels"])
        metrics.update({name + dev_set.suffix: value for name, value in scores.items()})
    return metrics


@functools.lru_cache(maxsize=4)
def _mapped_fisher_step(
    loss_fn: Callable, max_grad_norm: float | None, layout: parallel.Layout
) -> Callable:
    """The library's Fisher step mapped over ``layout`` (cached: a second pass with the same
    ``loss_fn`` reuses its compilation)."""
    return parallel.map_step(
        fisher_step(loss_fn, max_grad_norm=max_grad_norm, axis_name=parallel.AXIS),
        layout,
        (parallel.REPLICATED, parallel.REPLICATED, parallel.SHARDED, parallel.SHARED),
        parallel.REPLICATED,
        donate_argnums=(0,),
    )


def fisher_information(
    loss_fn: Callable,
    params: Any,
    batches: Iterable[dict],
    devices: Sequence[jax.Device],
    *,
    max_grad_norm: float | None = None,
    rng: jax.Array | None = None,
) -> Any:
    """``childtuning_jax.fisher_information`` over the run's devices, every process's included.

    The library's :func:`~childtuning_jax.fisher_step` (official rule) mapped over the layout:
    each device's gradient of its share, averaged over the devices, clipped and squared; batch
    ``i``'s key is ``fold_in(rng, i)``, each device folding in its index (dropout, as in training).
    ``batches`` are global batches (every process iterates the same ones; each places its share).
    The sum is one reduction over all devices, and process 0's copy is the result everywhere, so
    every process selects the same mask. Returns host (numpy) float32 arrays.
    """
    step = _mapped_fisher_step(loss_fn, max_grad_norm, parallel.as_layout(devices))
    acc = parallel.replicate(
        jax.tree.map(lambda p: np.zeros(np.shape(p), np.float32), params), devices
    )
    replicated_params = parallel.replicate(params, devices)
    count = 0
    for index, batch in enumerate(batches):
        batch_rng = None if rng is None else jax.random.fold_in(rng, index)
        acc = step(acc, replicated_params, parallel.shard_batch(batch, devices), batch_rng)
        count += 1
    total = distributed.broadcast(parallel.to_host(acc))
    # Divided by XLA, as the library divides (its float32 division can differ from numpy's in
    # the last bit), so the pmap layout gives the library's values exactly.
    fisher = fisher_mean(jax.tree.map(jnp.asarray, total), count)
    return jax.tree.map(np.asarray, fisher)
