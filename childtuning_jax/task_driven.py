"""ChildTuning-D (task-driven) as an optax gradient transformation, and its restore template.

Child-Tuning (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021) updates only a *child network* during fine-tuning. ChildTuning-D fixes it
before training from Fisher information (see :mod:`childtuning_jax.fisher` and
:mod:`childtuning_jax.selection`) and multiplies the gradients by that mask, without rescaling.
The state holds the mask as packed bits; :func:`uniform_leaf_names` and
:func:`template_child_mask` rebuild its layout to restore a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import paths
from childtuning_jax.leaf_layout import leaf_shape, match_layout, pack_mask_bits, unpack_mask_bits


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
        match_layout(names, shapes, params, "params")
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
        leaves, treedef, order = match_layout(names, shapes, updates, "updates")
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
        mask = np.ones(leaf_shape(param), bool)
        if name not in uniform and mask.size:
            mask.flat[0] = False
        return mask

    return paths.map_with_name(leaf, params)
