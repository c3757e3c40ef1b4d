"""The objective: per-example losses of a model on a task, built in one place.

The train step, the Fisher pass of ChildTuning-D and evaluation all call the model through
:class:`Model` and the loss through :func:`make_objective`. An objective is a function
``objective(params, batch, rng) -> per-example losses``; callers weight and sum them (padding rows
have weight 0). Regularisers that change the loss wrap an objective (R3F: a second, noisy forward
pass and a symmetric-KL term) or the params it sees (Mixout), so they combine with every mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Objective = Callable[[Any, dict, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class Model:
    """A model split for functional use: ``apply(params, batch, ...)`` runs the NNX module."""

    graphdef: Any
    rest: Any
    num_labels: int

    def apply(
        self, params: Any, batch: dict, *, dropout_rng: jax.Array | None, **kwargs
    ) -> jax.Array:
        """Logits of ``batch``; dropout is on when ``dropout_rng`` is given (training)."""
        module = nnx.merge(self.graphdef, params, self.rest)
        return module(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            deterministic=dropout_rng is None,
            dropout_rng=dropout_rng,
            **kwargs,
        )


def example_losses(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Per-example loss: cross-entropy, or squared error for regression (as ``transformers``)."""
    if regression:
        return jnp.square(logits[:, 0].astype(jnp.float32) - labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_objective(model: Model, regression: bool) -> Objective:
    """The task loss: ``objective(params, batch, rng)`` -> per-example losses, dropout on with
    ``rng``."""

    def objective(params: Any, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        logits = model.apply(params, batch, dropout_rng=rng)
        return example_losses(logits, batch["labels"], regression)

    return objective


def weighted_sum(objective: Objective) -> Callable[[Any, dict, jax.Array | None], jax.Array]:
    """``loss(params, batch, rng) = sum(objective(...) * batch['weights'])``."""

    def loss(params: Any, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        return jnp.sum(objective(params, batch, rng) * batch["weights"])

    return loss
