"""Optax-style masks over the params, and the per-leaf helpers of the anchored transforms.

Shared by :func:`~childtuning_jax.regularizers.decay_to_pretrained` and
:func:`~childtuning_jax.regularizers.recadam`, which hold a copy of the pretrained weights and
apply their terms only where a mask says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MaskOrFn = Any | Callable[[Any], Any] | None


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
