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
from collections.abc import Sequence
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
            # small threefry graphs for XLA to compile.
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
    jitted train step that donates its optimizer state pays a fixed cost per array argument, and
    a mask leaf per parameter tensor would add one such argument for every tensor.

    Attributes:
      mask: 1-D ``uint8``, the mask of every mixed leaf (some True, some False) as packed bits:
        each leaf flattened in C order and padded with False to a multiple of 8 elements, element
        ``8 * j + k`` in bit ``k`` (least significant first) of the leaf's byte ``j``
        (``np.packbits(..., bitorder="little")``), the leaves' bytes concatenated in the mask's
        ``jax.tree.leaves`` order. 1/8 byte per parameter of those leaves.
      uniform: 1-D bool, one value per uniform leaf (all True, like the embeddings, pooler and
        classifier that ChildTuning-D always trains, or all False), in the same order. The update
        reads no mask bytes for those leaves.

    A buffer with nothing to hold (no mixed leaves, or no uniform ones) holds one unused zero,
    since checkpointers refuse zero-size arrays.
    """

    mask: jax.Array
    uniform: jax.Array


# Bit k of a packed mask byte holds element 8 * j + k of its leaf (see ChildTuningDState.mask).
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def pack_mask_bits(leaf_mask: np.ndarray) -> np.ndarray:
    """One mixed leaf's bool mask as :class:`ChildTuningDState` bytes: C order, 8 per byte, least
    significant bit first, the last byte padded with False."""
    return np.packbits(np.asarray(leaf_mask, bool).reshape(-1), bitorder="little")


def unpack_mask_bits(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The inverse of :func:`pack_mask_bits` in JAX: bool of ``shape`` from its bytes.

    Elementwise, so XLA fuses it into the consumer: a loop reads one mask byte per 8 elements.
    """
    size = math.prod(shape)
    bits = (packed[:, None] >> _BIT_SHIFTS) & np.uint8(1)  # (bytes, 8): element 8 * j + k
    bits = bits.reshape(-1)
    if bits.shape[0] != size:
        bits = bits[:size]
    return bits.reshape(tuple(shape)) != 0


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


_PARAMS_COLLECTION = "params/"


def _strip_params_collection(names: list[str]) -> list[str] | None:
    """The names without a leading Linen ``params`` collection, if every name has one."""
    if names and all(name.startswith(_PARAMS_COLLECTION) for name in names):
        return [name[len(_PARAMS_COLLECTION) :] for name in names]
    return None


def _align(mask_names: list[str], tree_names: list[str]) -> list[int] | None:
    """For each tree leaf, the index of the mask leaf of the same name; None if the names differ.

    Leaves are matched by name, so the order and node types of the two trees may differ (an NNX
    ``State`` with ``Variable`` nodes or without, dicts or ``FrozenDict``).
    """
    if mask_names == tree_names:
        return list(range(len(mask_names)))
    if len(mask_names) != len(tree_names):
        return None
    index = {name: i for i, name in enumerate(mask_names)}
    if len(index) != len(mask_names) or set(tree_names) != index.keys():
        return None  # different names, or repeated names that only position could tell apart
    return [index[name] for name in tree_names]


def _match_layout(
    mask_names: list[str], mask_shapes: list[tuple[int, ...]], tree: Any, tree_name: str
) -> tuple[list[Any], Any, list[int]]:
    """Matches ``tree``'s leaves to the mask's by ``/``-joined name and checks their shapes.

    Tree types do not matter: the mask may be an NNX ``State`` of ``Param`` s while ``tree`` holds
    plain arrays (as ``nnx.Optimizer.update`` passes them), and a Linen ``params`` collection level
    present on only one side is ignored. Returns ``tree``'s leaves, its treedef, and the mask index
    of each leaf; raises ``ValueError`` naming the first path that differs.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    tree_names = [paths.keypath_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    order = _align(mask_names, tree_names)
    if order is None:
        stripped_tree = _strip_params_collection(tree_names)
        stripped_mask = _strip_params_collection(mask_names)
        if stripped_tree is not None:
            order = _align(mask_names, stripped_tree)
        if order is None and stripped_mask is not None:
            order = _align(stripped_mask, tree_names)
    if order is None:
        _raise_name_mismatch(mask_names, tree_names, tree_name)
    for leaf, i, name in zip(leaves, order, tree_names, strict=True):
        tree_shape = _shape(leaf)
        if mask_shapes[i] != tree_shape:
            raise ValueError(
                f"mask leaf '{mask_names[i]}' has shape {mask_shapes[i]} but the {tree_name} leaf "
                f"'{name}' has shape {tree_shape}"
            )
    return leaves, treedef, order


def _raise_name_mismatch(mask_names: list[str], tree_names: list[str], tree_name: str) -> None:
    """Raises a ``ValueError`` naming the first leaf where the names differ."""
    if len(mask_names) != len(tree_names):
        mask_longer = len(mask_names) > len(tree_names)
        longer, shorter = (mask_names, tree_names) if mask_longer else (tree_names, mask_names)
        known = set(shorter)
        extra = next((name for name in longer if name not in known), longer[len(shorter)])
        owner = "mask" if mask_longer else tree_name
        raise ValueError(
            f"mask has {len(mask_names)} leaves but the {tree_name} have {len(tree_names)}; "
            f"first unmatched leaf: '{extra}' (only in the {owner})"
        )
    i, mask_name, tree_name_i = next(
        (i, a, b) for i, (a, b) in enumerate(zip(mask_names, tree_names, strict=True)) if a != b
    )
    raise ValueError(
        f"mask and {tree_name} differ in structure at leaf {i}: the mask has '{mask_name}' where "
        f"the {tree_name} have '{tree_name_i}'"
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


def _is_uniform(leaf_mask: np.ndarray) -> bool:
    """Whether ``child_tuning_d`` keeps this leaf in its ``uniform`` buffer: non-empty and all True
    or all False. The one definition of a uniform leaf; it decides the state's layout."""
    return bool(leaf_mask.size) and bool(leaf_mask.all() or not leaf_mask.any())


def child_tuning_d(mask: Any) -> optax.GradientTransformation:
    """ChildTuning-D: multiply gradients by a fixed boolean mask, without rescaling.

    The mask selects the child network: the top-``reserve_p`` encoder-layer parameters by Fisher
    information, with every parameter outside the encoder layers always trained (Xu et al., 2021,
    Sec. 3.2; build it with :func:`childtuning_jax.fisher_information` and
    :func:`childtuning_jax.fisher_mask`). Elements where the mask is False get a zero gradient.

    The mask is matched to the params and updates by leaf name (the ``/``-joined key paths of
    :mod:`childtuning_jax.paths`) and shape, not by pytree type: a mask built from an NNX ``State``
    of ``Param`` s works with the plain arrays ``nnx.Optimizer.update`` passes, and Linen dicts,
    ``FrozenDict`` s and a ``{'params': ...}`` collection level on either side work too. The
    updates come back in the structure they came in.

    Args:
      mask: a pytree of boolean arrays (0/1 numbers are accepted) with the leaf names and shapes
        of the params. The state holds it as :class:`ChildTuningDState`: packed bits (1/8 byte
        per parameter) for the mixed leaves, one bool per uniform (all True or all False) leaf.

    Returns:
      An ``optax.GradientTransformation``. ``init`` (call it outside ``jit``) returns a fresh copy
      of the mask in the state, after checking it against the params; ``update`` checks the
      updates the same way: a ``ValueError`` names the first differing path.
    """
    bool_mask = _as_bool_mask(mask)
    flat = jax.tree_util.tree_flatten_with_path(bool_mask)[0]
    names = [paths.keypath_to_str(p) for p, _ in flat]
    shapes = [m.shape for _, m in flat]
    # Per mask leaf: ("uniform", index into state.uniform) or ("mixed", byte offset into
    # state.mask, shape).
    slots: list[tuple[Any, ...]] = []
    uniform_values, mixed_parts, offset = [], [], 0
    for _, m in flat:
        if _is_uniform(m):
            slots.append(("uniform", len(uniform_values)))
            uniform_values.append(bool(m.flat[0]))
        else:
            slots.append(("mixed", offset, m.shape))
            mixed_parts.append(pack_mask_bits(m))
            offset += mixed_parts[-1].size
    # An empty buffer holds one unused zero instead: checkpointers refuse zero-size arrays.
    packed_host = np.concatenate(mixed_parts) if mixed_parts else np.zeros(1, np.uint8)
    uniform_host = np.asarray(uniform_values or [False], dtype=bool)
    del bool_mask, flat, mixed_parts

    def init_fn(params: Any) -> ChildTuningDState:
        _match_layout(names, shapes, params, "params")
        # Fresh copies: a train step that donates the state deletes neither the transform's
        # buffers nor the caller's mask.
        return ChildTuningDState(
            mask=jnp.array(packed_host, copy=True), uniform=jnp.array(uniform_host, copy=True)
        )

    def leaf_mask(state: ChildTuningDState, slot: tuple[Any, ...]) -> jax.Array:
        if slot[0] == "uniform":
            return state.uniform[slot[1]]
        _, start, shape = slot
        size = -(-math.prod(shape) // 8)
        return unpack_mask_bits(jax.lax.slice(state.mask, (start,), (start + size,)), shape)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, order = _match_layout(names, shapes, updates, "updates")
        expected = ((packed_host.size,), (uniform_host.size,))
        if (np.shape(state.mask), np.shape(state.uniform)) != expected:
            raise ValueError(
                f"ChildTuningDState holds mask {np.shape(state.mask)} and uniform "
                f"{np.shape(state.uniform)}, but this transform's mask needs {expected[0]} and "
                f"{expected[1]}: the state comes from a different mask"
            )
        if state.mask.dtype != np.uint8:
            raise ValueError(
                f"ChildTuningDState.mask must be packed uint8 bits, got dtype {state.mask.dtype}"
            )
        # XLA fuses the unpacking into every elementwise loop that reads the masked gradient
        # (AdamW's mu and nu loops), which then read 1/8 byte of mask per element.
        masked = [
            jnp.where(leaf_mask(state, slots[i]), g, jnp.zeros((), g.dtype))
            for g, i in zip(leaves, order, strict=True)
        ]
        return jax.tree.unflatten(treedef, masked), state

    return optax.GradientTransformation(init_fn, update_fn)


def uniform_leaf_names(mask: Any) -> list[str]:
    """Names of the mask's all-True or all-False leaves (child_tuning_d keeps them in its `uniform`
    buffer, so they decide the state's layout).

    Saved with a checkpoint, they let :func:`template_child_mask` rebuild a restore target without
    recomputing the Fisher information.
    """
    bool_mask = _as_bool_mask(mask)
    return [
        name
        for name, leaf in zip(paths.leaf_names(bool_mask), jax.tree.leaves(bool_mask), strict=True)
        if _is_uniform(leaf)
    ]


def template_child_mask(params: Any, uniform_leaves: Sequence[str]) -> Any:
    """A stand-in mask whose child_tuning_d state has the layout of a saved one (restore target):
    all True on the uniform_leaves, mixed (first element False) elsewhere.

    Only the layout is right, not the values: the checkpoint holds the real mask, and restoring
    the optimizer state overwrites the template's. ``params`` are those the saved mask was built
    for, in the same leaf order (the state concatenates mixed leaves in that order); they may be
    abstract (``jax.ShapeDtypeStruct`` leaves). The template has their structure.
    """
    uniform = set(uniform_leaves)

    def leaf(name: str, param: Any) -> np.ndarray:
        mask = np.ones(_shape(param), bool)
        if name not in uniform and mask.size:
            mask.flat[0] = False
        return mask

    return paths.map_with_name(leaf, params)
