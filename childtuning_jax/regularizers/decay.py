"""Weight decay towards the pretrained weights (L2-SP), as an optax transform.

L2-SP (Li et al., "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
ICML 2018) replaces the usual decay towards zero with a decay towards the starting point of
fine-tuning: the penalty ``coefficient / 2 * ||params - pretrained||**2``, whose gradient is
``coefficient * (params - pretrained)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax.leaf_layout import check_like_params
from childtuning_jax.regularizers.tree_masks import (
    MaskOrFn,
    copy_tree,
    is_off,
    resolve_mask,
    select,
)


class DecayToPretrainedState(NamedTuple):
    """State of :func:`decay_to_pretrained`.

    Attributes:
      count: number of updates so far (for a ``coefficient`` schedule).
      pretrained: the anchor weights, a copy made at ``init``: checkpointed and replicated with
        the rest of the optimizer state.
    """

    count: jax.Array
    pretrained: Any


def decay_to_pretrained(
    pretrained: Any,
    coefficient: float | optax.Schedule,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Adds ``coefficient * (params - pretrained)`` to the incoming updates.

    The gradient of the L2-SP penalty ``coefficient / 2 * ||params - pretrained||**2`` (Li et al.,
    ICML 2018). Where it sits in the chain decides which regulariser it is:

    * before the optimizer, it adds the penalty's gradient to the loss gradient (loss-penalty,
      L2-SP form); Adam's moments see it and normalise it like the task gradient::

        optax.chain(decay_to_pretrained(pretrained, 0.01), optax.adam(2e-5))

    * after Adam's scaling and before the learning rate, it is decoupled, as ``optax.adamw``'s
      weight decay, but towards ``pretrained`` instead of zero: each step moves the params by
      ``-lr * coefficient * (params - pretrained)`` on top of the Adam step::

        optax.chain(
            optax.scale_by_adam(),
            decay_to_pretrained(pretrained, 0.01),
            optax.scale_by_learning_rate(2e-5),
        )

    With Child-Tuning, placing it after ``child_tuning_d``/``child_tuning_f`` lets parameters
    outside the child network be pulled back too; placing it before the mask masks the penalty's
    gradient with the task gradient.

    Args:
      pretrained: the anchor weights, a pytree with the structure and leaf shapes of the params
        (e.g. the params at the start of fine-tuning, new head included). ``init`` copies it into
        the state, so the caller may drop its own reference.
      coefficient: the penalty strength, a non-negative float or an optax schedule of the step.
      mask: a pytree of booleans like the params (or a prefix of them; leaves may also be bool
        arrays shaped like the params), or a callable returning one given the params: False
        leaves (elements) pass their updates through unchanged.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``.
    """
    if not callable(coefficient):
        coefficient = float(coefficient)
        if not np.isfinite(coefficient) or coefficient < 0:
            raise ValueError(f"coefficient must be a finite number >= 0, got {coefficient!r}")

    def init_fn(params: Any) -> DecayToPretrainedState:
        check_like_params(pretrained, params, "pretrained")
        return DecayToPretrainedState(
            count=jnp.zeros([], jnp.int32), pretrained=copy_tree(pretrained)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "decay_to_pretrained needs the params: call update(updates, state, params)"
            )
        c = coefficient(state.count) if callable(coefficient) else coefficient
        keep = resolve_mask(mask, params)
        if keep is None:
            keep = jax.tree.map(lambda _: True, params)

        def add(u, p, pre, k):
            if is_off(k):
                return u
            decayed = u + c * (p - pre.astype(p.dtype))
            return select(k, decayed, u).astype(u.dtype)

        new_updates = jax.tree.map(add, updates, params, state.pretrained, keep)
        return new_updates, DecayToPretrainedState(
            count=optax.safe_increment(state.count), pretrained=state.pretrained
        )

    return optax.GradientTransformation(init_fn, update_fn)
