"""How one tree's leaves line up with another's: matching by name and shape, and packed bits.

Shared by the transforms that hold a tree like the params (:mod:`childtuning_jax.task_driven`'s
mask, the regularisers' anchor weights). Names are the ``/``-joined key paths of
:mod:`childtuning_jax.paths`, so trees of different pytree types (an NNX ``State`` of ``Param`` s
and the plain arrays ``nnx.Optimizer.update`` passes, Linen dicts or ``FrozenDict`` s) still match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from childtuning_jax import paths


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """The shape of an array leaf, abstract (``jax.ShapeDtypeStruct``) or not, or of a scalar."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------

# Bit k of a packed mask byte holds element 8 * j + k of its leaf (see ChildTuningDState.mask).
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def pack_mask_bits(leaf_mask: np.ndarray) -> np.ndarray:
    """One mixed leaf's bool mask as ``ChildTuningDState.mask`` bytes
    (:mod:`childtuning_jax.task_driven`): C order, 8 per byte, least significant bit first, the
    last byte padded with False."""
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


# ---------------------------------------------------------------------------------------------
# Matching by name and shape
# ---------------------------------------------------------------------------------------------

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


def match_layout(
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
        tree_shape = leaf_shape(leaf)
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


def check_like_params(tree: Any, params: Any, what: str) -> None:
    """Raises a ``ValueError`` naming the first leaf where ``tree`` and ``params`` differ.

    Stricter than :func:`match_layout`: the same leaves in the same order (as ``jax.tree.map``
    over the two needs).
    """
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
        if leaf_shape(tree_leaf) != leaf_shape(param_leaf):
            raise ValueError(
                f"{what} leaf '{tree_name}' has shape {leaf_shape(tree_leaf)} but the params leaf "
                f"has shape {leaf_shape(param_leaf)}"
            )
    if len(tree_leaves) != len(param_leaves):
        raise ValueError(
            f"{what} has {len(tree_leaves)} leaves but the params have {len(param_leaves)}"
        )
