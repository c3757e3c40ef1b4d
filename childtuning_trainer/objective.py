"""The objective: per-example losses of a model on a task, built in one place.

The train step, the Fisher pass of ChildTuning-D and evaluation all call the model through
:class:`Model` and the loss through :func:`make_objective`. An objective is a function
``objective(params, batch, rng) -> per-example losses``; callers weight and sum them (padding rows
have weight 0). Regularisers that change the loss wrap an objective (:func:`r3f_objective`: a
second, noisy forward pass and a symmetric-KL term) or the params it sees
(:func:`mixout_objective`), so they combine with every mode. Only training uses the wrappers:
evaluation runs the model on the params unchanged, and ChildTuning-D's Fisher pass uses the plain
task loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from childtuning_jax.regularizers import mixout, r3f_loss

Objective = Callable[[Any, dict, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class Model:
    """A model split for functional use: ``apply(params, batch, ...)`` runs the NNX module."""

    graphdef: Any
    rest: Any
    num_labels: int
    architecture: str | None = None  # the ``transformers`` config as JSON (keys the Fisher cache)

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


# The batch key under which the train step hands Mixout its anchor (the params at step 0).
ANCHOR = "mixout_pretrained"


def mixout_objective(model: Model, regression: bool, p: float) -> Objective:
    """Mixout's training loss: the task loss of the model run on
    ``mixout(params, batch[ANCHOR], p, rng)`` (``childtuning_jax.mixout``: every Linear kernel,
    classifier included, as the reference wraps every ``nn.Linear``).

    The model runs without dropout: mixout replaces it, as in the reference, which sets every
    dropout to 0 (the trainer sets ``config.dropout = 0`` for mixout). ``rng`` draws the masks and
    is required.
    """

    def objective(params: Any, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        if rng is None:
            raise ValueError("the mixout objective needs an rng key for its masks")
        mixed = mixout(params, batch[ANCHOR], p, rng)
        logits = model.apply(mixed, batch, dropout_rng=None)
        return example_losses(logits, batch["labels"], regression)

    return objective


def r3f_objective(
    model: Model,
    regression: bool,
    *,
    eps: float,
    lambda_: float,
    noise_type: str,
    dropout: bool,
) -> Objective:
    """R3F's training loss (``childtuning_jax.r3f_loss``): the task loss of a clean pass plus
    ``lambda_`` times the symmetric KL (squared difference for regression) to a pass with noise on
    the word embeddings (``Model.apply(..., perturb_embeddings=...)``).

    ``rng`` is required (it draws the noise); with ``dropout`` the two passes also get their own
    dropout keys from it.
    """

    def apply_fn(params: Any, batch: dict, key: jax.Array, perturb: Any) -> jax.Array:
        rng = key if dropout else None
        return model.apply(params, batch, dropout_rng=rng, perturb_embeddings=perturb)

    return r3f_loss(
        apply_fn,
        lambda logits, batch: example_losses(logits, batch["labels"], regression),
        eps=eps,
        lambda_=lambda_,
        noise_type=noise_type,
        regression=regression,
    )
