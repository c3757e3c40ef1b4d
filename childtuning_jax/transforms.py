"""Child-Tuning as optax gradient transformations.

Child-Tuning (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021) updates only a *child network* during fine-tuning: the gradients of every
other parameter are set to zero, while the forward pass still uses the whole model. The mask acts on
the gradient before the optimizer, so Adam's moments see masked gradients and decoupled weight decay
still applies to every decayed parameter. The official recipe's order is::

  optax.chain(
      optax.clip_by_global_norm(max_grad_norm),
      child_tuning_d(mask),          # or child_tuning_f(reserve_p, key)
      optax.adamw(learning_rate, weight_decay=0.01, mask=decay_mask),
  )

* ``child_tuning_f`` (task-free): a fresh Bernoulli(p) mask over every gradient element at every
  step, kept gradients rescaled by 1/p (paper, Eq. 6).
* ``child_tuning_d`` (task-driven): a fixed mask chosen before training from Fisher information
  (see :mod:`childtuning_jax.fisher` and :mod:`childtuning_jax.selection`), no rescaling.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import hash_random, paths

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


# ---------------------------------------------------------------------------------------------
# ChildTuning-F
# ---------------------------------------------------------------------------------------------


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

    threshold = hash_random.keep_threshold(reserve_p)
    scale = (
        hash_random.UINT32_RANGE / threshold if sampler == "hash" else 1.0 / reserve_p
    )  # 1 / p_eff

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
        if sampler == "hash":
            # All leaves' seeds from one threefry call: one call per leaf would be hundreds of
            # small threefry graphs for XLA to compile (about 40 s more on CPU for BERT-base).
            seeds = jax.random.bits(mask_key, (max(len(leaves), 1), 2), jnp.uint32)
        else:
            leaf_keys = jax.random.split(mask_key, max(len(leaves), 1))
        masked = []
        for i, grad in enumerate(leaves):
            if sampler == "hash":
                keep = hash_random.uniform_bits(grad.shape, seeds[i]) < jnp.uint32(threshold)
            else:
                keep = jax.random.bernoulli(leaf_keys[i], reserve_p, grad.shape)
            masked.append(
                jnp.where(keep, grad * jnp.asarray(scale, grad.dtype), 0).astype(grad.dtype)
            )
        new_state = ChildTuningFState(key=jax.random.key_data(next_key))
        return jax.tree.unflatten(treedef, masked), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# ChildTuning-D
# ---------------------------------------------------------------------------------------------


class ChildTuningDState(NamedTuple):
    """State of :func:`child_tuning_d`: the fixed boolean mask, in two flat buffers.

    Kept in the state (not closed over as a constant) so it is checkpointed with the optimizer and
    replicated like any other optimizer state. Two leaves instead of one per parameter tensor: a
    jitted train step that donates its optimizer state pays per argument, and on a GPU one mask
    leaf per parameter tensor made ``chain(D, adamw)`` 1.23x ``adamw`` (H200, BERT-base).

    Attributes:
      mask: 1-D bool, the mask of every mixed leaf (some True, some False), each flattened in C
        order, concatenated in ``jax.tree.leaves`` order. One byte per parameter of those leaves.
      uniform: 1-D bool, one value per uniform leaf (all True, like the embeddings, pooler and
        classifier that ChildTuning-D always trains, or all False), in the same order. The update
        reads no mask bytes for those leaves.
    """

    mask: jax.Array
    uniform: jax.Array


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def _check_same_layout(mask: Any, tree: Any, tree_name: str) -> None:
    """Raises naming the first path where ``mask`` and ``tree`` differ in structure or shape."""
    mask_leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    tree_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    mask_names = [paths.keypath_to_str(p) for p, _ in mask_leaves]
    tree_names = [paths.keypath_to_str(p) for p, _ in tree_leaves]
    for i, (mask_name, tree_name_i) in enumerate(zip(mask_names, tree_names, strict=False)):
        if mask_name != tree_name_i:
            raise ValueError(
                f"mask and {tree_name} differ in structure at leaf {i}: the mask has "
                f"'{mask_name}' where the {tree_name} have '{tree_name_i}'"
            )
        mask_shape = _shape(mask_leaves[i][1])
        tree_shape = _shape(tree_leaves[i][1])
        if mask_shape != tree_shape:
            raise ValueError(
                f"mask leaf '{mask_name}' has shape {mask_shape} but the {tree_name} leaf has "
                f"shape {tree_shape}"
            )
    if len(mask_names) != len(tree_names):
        extra = (
            mask_names[len(tree_names)]
            if len(mask_names) > len(tree_names)
            else tree_names[len(mask_names)]
        )
        owner = "mask" if len(mask_names) > len(tree_names) else tree_name
        raise ValueError(
            f"mask has {len(mask_names)} leaves but the {tree_name} have {len(tree_names)}; "
            f"first unmatched leaf: '{extra}' (only in the {owner})"
        )
    if jax.tree.structure(mask) != jax.tree.structure(tree):
        raise ValueError(
            f"mask and {tree_name} have the same leaf names but different tree structures: "
            f"{jax.tree.structure(mask)} vs {jax.tree.structure(tree)}"
        )


def _as_bool_mask(mask: Any) -> Any:
    """The mask as host NumPy bool arrays (0/1 numbers accepted), checked leaf by leaf."""

    def convert(name: str, leaf: Any) -> np.ndarray:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"mask leaf '{name}' must be an array, got {type(leaf).__name__}")
        values = np.asarray(leaf)
        if values.dtype == np.bool_:
            return values
        if values.dtype.kind not in "iuf":
            raise TypeError(f"mask leaf '{name}' must be boolean, got dtype {leaf.dtype}")
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"mask leaf '{name}' must hold only 0/1 or booleans")
        return values.astype(bool)

    return paths.map_with_name(convert, mask)


def child_tuning_d(mask: Any) -> optax.GradientTransformation:
    """ChildTuning-D: multiply gradients by a fixed boolean mask, without rescaling.

    The mask selects the child network: the top-``reserve_p`` encoder-layer parameters by Fisher
    information, with every parameter outside the encoder layers always trained (Xu et al., 2021,
    Sec. 3.2; build it with :func:`childtuning_jax.fisher_information` and
    :func:`childtuning_jax.fisher_mask`). Elements where the mask is False get a zero gradient.

    Args:
      mask: a pytree of boolean arrays (0/1 numbers are accepted) with the structure and leaf
        shapes of the params. The state holds it as :class:`ChildTuningDState`: one byte per
        parameter of the mixed leaves, one bool per uniform (all True or all False) leaf.

    Returns:
      An ``optax.GradientTransformation``. ``init`` (call it outside ``jit``) returns a fresh copy
      of the mask in the state, after checking it against the params; ``update`` checks the
      updates the same way: a ``ValueError`` names the first differing path.
    """
    bool_mask = _as_bool_mask(mask)
    leaves, treedef = jax.tree.flatten(bool_mask)
    layout = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(m.shape, jnp.bool_) for m in leaves])
    # Per leaf: ("uniform", index into state.uniform) or ("mixed", offset into state.mask, shape).
    slots: list[tuple[Any, ...]] = []
    uniform_values, mixed_parts, offset = [], [], 0
    for m in leaves:
        if m.size and (m.all() or not m.any()):
            slots.append(("uniform", len(uniform_values)))
            uniform_values.append(bool(m.flat[0]))
        else:
            slots.append(("mixed", offset, m.shape))
            mixed_parts.append(m.reshape(-1))
            offset += m.size
    # The transform keeps the mask on the host as packed bits (1/8 byte per parameter) and hands
    # out a fresh device copy at each init: donating the optimizer state in a train step then
    # deletes neither the transform's copy nor the caller's mask, and the device holds one mask.
    packed_mask = np.packbits(np.concatenate(mixed_parts) if mixed_parts else np.zeros(0, bool))
    mixed_size = offset
    uniform_host = np.asarray(uniform_values, dtype=bool)
    del bool_mask, leaves, mixed_parts

    def init_fn(params: Any) -> ChildTuningDState:
        _check_same_layout(layout, params, "params")
        unpacked = np.unpackbits(packed_mask, count=mixed_size).view(bool)  # 0/1 bytes: no copy
        return ChildTuningDState(mask=jnp.asarray(unpacked), uniform=jnp.asarray(uniform_host))

    def leaf_mask(state: ChildTuningDState, slot: tuple[Any, ...]) -> jax.Array:
        if slot[0] == "uniform":
            return state.uniform[slot[1]]
        _, start, shape = slot
        return jax.lax.slice(state.mask, (start,), (start + math.prod(shape),)).reshape(shape)

    def update_fn(updates, state, params=None):
        del params
        _check_same_layout(layout, updates, "updates")
        expected = ((mixed_size,), (uniform_host.size,))
        if (np.shape(state.mask), np.shape(state.uniform)) != expected:
            raise ValueError(
                f"ChildTuningDState holds mask {np.shape(state.mask)} and uniform "
                f"{np.shape(state.uniform)}, but this transform's mask needs {expected[0]} and "
                f"{expected[1]}: the state comes from a different mask"
            )
        masked = [
            jnp.where(leaf_mask(state, slot), g, jnp.zeros((), g.dtype))
            for g, slot in zip(treedef.flatten_up_to(updates), slots, strict=True)
        ]
        return jax.tree.unflatten(treedef, masked), state

    return optax.GradientTransformation(init_fn, update_fn)
