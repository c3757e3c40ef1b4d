"""The train and eval steps, written per device and mapped over the data axis by the caller."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_trainer import input_pipeline, parallel
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
        outputs = []
        for batch in input_pipeline.eval_batches(features, batch_size, data.padding):
            weights = batch.pop("weights")
            logits = np.asarray(p_eval_step(params, parallel.shard_batch(batch, devices)))
            outputs.append(logits.reshape(batch_size, -1)[weights > 0])
        preds = task_metrics.predictions(data.task, np.concatenate(outputs))
        scores = task_metrics.compute_metrics(data.task, preds, features["labels"])
        metrics.update({name + dev_set.suffix: value for name, value in scores.items()})
    return metrics
