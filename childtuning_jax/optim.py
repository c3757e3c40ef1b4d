"""The official recipe's AdamW, as an optax transform.

Child-Tuning's official optimizer (``ChildTuningAdamW``) is a copy of Hugging Face's former
``transformers.AdamW`` with the gradient mask applied first. Its AdamW differs from
``optax.adamw`` in two small ways, which matter only for exact reproduction:

* ``eps`` is added to ``sqrt(v)`` before bias correction: the step is
  ``lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``;
* decoupled weight decay is applied after the Adam step, to the already-updated parameter:
  ``p <- (p - adam_step) * (1 - lr * weight_decay)``.

:func:`hf_adamw` reproduces both. Chain it after the Child-Tuning mask, as the official code
applies the mask at the top of its step::

  optax.chain(optax.clip_by_global_norm(1.0), child_tuning_d(mask), hf_adamw(schedule, ...))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class HFAdamWState(NamedTuple):
    """Step count and the first and second moments (float32, like the params)."""

    count: jax.Array
    mu: Any
    nu: Any


def hf_adamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """AdamW exactly as Hugging Face's former ``AdamW(correct_bias=True)`` and ChildTuningAdamW.

    Args:
      learning_rate: a float or an optax schedule, evaluated at the step count before this update
        (as a PyTorch ``LambdaLR`` stepped after ``optimizer.step()``).
      b1, b2, eps: Adam's coefficients.
      weight_decay: decoupled weight decay, applied after the Adam step.
      mask: a pytree of booleans like the params (or a callable returning one) selecting the
        parameters that decay, e.g. everything but biases and LayerNorm weights.

    Returns:
      An ``optax.GradientTransformation``; ``update`` requires ``params``.
    """

    def init_fn(params: Any) -> HFAdamWState:
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
        return HFAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("hf_adamw needs params for its decoupled weight decay")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        t = count.astype(jnp.float32)
        step_size = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        adam = jax.tree.map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        decays = mask(params) if callable(mask) else mask
        if decays is None:
            decays = jax.tree.map(lambda _: True, params)

        def with_decay(step, p, decay):
            decayed = step - lr * weight_decay * (p + step)
            return jnp.where(decay, decayed, step).astype(jnp.result_type(p))

        new_updates = jax.tree.map(with_decay, adam, params, decays)
        return new_updates, HFAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
