"""Weight decay towards the pretrained weights (L2-SP), as an optax transform.

L2-SP (Li et al., "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
ICML 2018) replaces the usual decay towards zero with a decay towards the starting point of
fine-tuning: the penalty ``coefficient / 2 * ||params - pretrained||**2``, whose gradient is
``coefficient * (params - pretrained)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import paths

MaskOrFn = Any | Callable[[Any], Any] | None


class DecayToPretrainedState(NamedTuple):
    """State of :func:`decay_to_pretrained`.

    Attributes:
      count: number of updates so far (for a ``coefficient`` schedule).
      pretrained: the anchor weights, a copy made at ``init``: checkpointed and replicated with
        the rest of the optimizer state.
    """

    count: jax.Array
    pretrained: Any


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def check_like_params(tree: Any, params: Any, what: str) -> None:
    """Raises a ``ValueError`` naming the first leaf where ``tree`` and ``params`` differ."""
    tree_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (tree_path, tree_leaf), (param_path, param_leaf) in zip(
        tree_leaves, param_leaves, strict=False
    ):
        tree_name = paths.keypath_to_str(tree_path)
        param_name = paths.keypath_to_str(param_path)
        if tree_name != param_name:
            raise ValueError(
                f"{what} and params differ in structure: {what} has '{tree_name}' where the "
                f"params have '{param_name}'"
            )
        if _shape(tree_leaf) != _shape(param_leaf):
            raise ValueError(
                f"{what} leaf '{tree_name}' has shape {_shape(tree_leaf)} but the params leaf "
                f"has shape {_shape(param_leaf)}"
            )
    if len(tree_leaves) != len(param_leaves):
        raise ValueError(
            f"{what} has {len(tree_leaves)} leaves but the params have {len(param_leaves)}"
        )


def resolve_mask(mask: MaskOrFn, params: Any) -> Any:
    """The mask as a pytree shaped like ``params``, or None for "every leaf".

    ``mask`` is a pytree of booleans (one per leaf, or bool arrays shaped like the leaves) with
    the structure of ``params`` or a prefix of it, or a callable returning one given the params,
    as optax's masks.
    """
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)


def select(keep: Any, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where ``keep`` (a bool or bool array), else ``old``; static bools skip the where."""
    if isinstance(keep, bool | np.bool_):
        return new if keep else old
    return jnp.where(keep, new, old)


def is_off(keep: Any) -> bool:
    """True for a static False mask leaf: nothing to compute for that leaf."""
    return isinstance(keep, bool | np.bool_) and not keep


def copy_tree(tree: Any) -> Any:
    """A fresh device copy of every leaf (so a donated optimizer state never deletes the caller's
    arrays)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


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
