"""ChildTuning-F (task-free) as an optax gradient transformation.

Child-Tuning (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021) updates only a *child network* during fine-tuning. ChildTuning-F draws it
afresh at every step: a Bernoulli(p) mask over every gradient element, kept gradients rescaled by
1/p (paper, Eq. 6). Chain it before the optimizer, as ``child_tuning_d`` (see
:mod:`childtuning_jax`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtuning_jax import hash_random

Sampler = Literal["hash", "jax"]


def check_reserve_p(reserve_p: float) -> float:
    """Returns ``reserve_p`` as a float, or raises if it is not in (0, 1]."""
    try:
        value = float(reserve_p)
    except (TypeError, ValueError):
        raise TypeError(f"reserve_p must be a number in (0, 1], got {reserve_p!r}") from None
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"reserve_p must be in (0, 1], got {reserve_p!r}")
    return value


class ChildTuningFState(NamedTuple):
    """State of :func:`child_tuning_f`: the raw data of the PRNG key for the next update.

    Raw ``uint32`` key data (``jax.random.key_data``) rather than a typed key, so the state
    checkpoints like any array and a state replicated over devices draws the same masks everywhere.
    """

    key: jax.Array


def child_tuning_f(
    reserve_p: float, key: jax.Array, *, sampler: Sampler = "hash"
) -> optax.GradientTransformation:
    """ChildTuning-F: keep each gradient element with probability ``reserve_p``, rescaled.

    Every ``update`` draws a fresh Bernoulli mask for every element of every gradient leaf and
    returns ``grad * mask / p_eff``, where ``p_eff`` is the keep-probability actually used, so
    ``E[update] = grad`` exactly (Xu et al., 2021, Eq. 6; the official code divides by
    ``reserve_p``).

    Sampling (``sampler``):

    * ``"hash"`` (default): for each step and leaf, two 32-bit seeds are drawn from ``key`` with
      JAX's threefry; each element's 32 random bits are a keyed integer hash of its index,
      ``lowbias32(index * (seed1 | 1) + seed0)`` (:mod:`childtuning_jax.hash_random`). The
      element is kept when its bits fall below ``t = round(reserve_p * 2**32)``, so
      ``p_eff = t / 2**32`` (within 2**-32 of ``reserve_p``). This fuses into the optimizer
      update and costs a few integer operations per element.
    * ``"jax"``: ``jax.random.bernoulli`` per leaf (threefry per element, slower on CPU), with
      ``p_eff = reserve_p``.

    Masks are independent across leaves and steps; the same key gives the same sequence of masks on
    the same platform. The key lives in the state: replicated states draw identical masks on every
    device (as data-parallel training needs), and a restored state continues the same stream.

    Args:
      reserve_p: probability of keeping each gradient element, in (0, 1].
      key: a JAX PRNG key, typed (``jax.random.key``) or legacy (``jax.random.PRNGKey``).
      sampler: ``"hash"`` or ``"jax"``, as above.

    Returns:
      An ``optax.GradientTransformation``; ``reserve_p == 1`` keeps every gradient unchanged.
    """
    reserve_p = check_reserve_p(reserve_p)
    impl, key_data = split_key(key, sampler)
    scale = keep_scale(reserve_p, sampler)  # 1 / p_eff

    def init_fn(params: Any) -> ChildTuningFState:
        del params
        # A fresh copy: a train step that donates the state must not delete the closure's key.
        return ChildTuningFState(key=jnp.array(key_data, copy=True))

    def update_fn(updates, state, params=None):
        del params
        if reserve_p == 1.0:
            return updates, state
        step_key = jax.random.wrap_key_data(state.key, impl=impl)
        next_key, mask_key = jax.random.split(step_key)
        leaves, treedef = jax.tree.flatten(updates)
        keeps = keep_masks(mask_key, [g.shape for g in leaves], reserve_p, sampler)
        masked = [
            jnp.where(keep, grad * jnp.asarray(scale, grad.dtype), 0).astype(grad.dtype)
            for keep, grad in zip(keeps, leaves, strict=True)
        ]
        new_state = ChildTuningFState(key=jax.random.key_data(next_key))
        return jax.tree.unflatten(treedef, masked), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def split_key(key: jax.Array, sampler: Sampler) -> tuple[Any, jax.Array]:
    """``(impl, raw uint32 key data)`` of a typed or legacy PRNG key, checked (``impl`` None: the
    default implementation); also checks ``sampler``."""
    if sampler not in ("hash", "jax"):
        raise ValueError(f"sampler must be 'hash' or 'jax', got {sampler!r}")
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a JAX PRNG key array, got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(key)
        key_data = jax.random.key_data(key)
    else:
        impl = None  # legacy uint32 key: the default implementation
        key_data = key
        if key_data.dtype != jnp.uint32:
            raise TypeError(f"a legacy PRNG key must be uint32 data, got dtype {key.dtype}")
    if key_data.ndim != 1:
        raise ValueError(f"key must be a single PRNG key, got key data of shape {key_data.shape}")
    return impl, key_data


def keep_scale(reserve_p: float, sampler: Sampler) -> float:
    """``1 / p_eff``: the factor on kept gradients, so that ``E[update] = grad`` exactly."""
    if sampler == "hash":
        return hash_random.UINT32_RANGE / hash_random.keep_threshold(reserve_p)
    return 1.0 / reserve_p


def keep_masks(
    mask_key: jax.Array, shapes: list[tuple[int, ...]], reserve_p: float, sampler: Sampler
) -> list[jax.Array]:
    """One step's keep decisions, a boolean array per leaf shape (leaf ``i`` of ``jax.tree.leaves``
    order gets the ``i``-th), drawn from that step's ``mask_key`` as :func:`child_tuning_f` does."""
    count = max(len(shapes), 1)
    if sampler == "jax":
        leaf_keys = jax.random.split(mask_key, count)
        return [jax.random.bernoulli(leaf_keys[i], reserve_p, s) for i, s in enumerate(shapes)]
    # All leaves' seeds from one threefry call: one call per leaf would be hundreds of small
    # threefry graphs for XLA to compile.
    seeds = jax.random.bits(mask_key, (count, 2), jnp.uint32)
    threshold = jnp.uint32(hash_random.keep_threshold(reserve_p))
    return [hash_random.uniform_bits(s, seeds[i]) < threshold for i, s in enumerate(shapes)]
