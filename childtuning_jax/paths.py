"""Names for pytree leaves: key paths joined with ``/``.

Child-Tuning chooses parameters by name (the official code keeps encoder-layer parameters, those
whose name contains ``layer``), so every part of the library names a leaf the same way:
``bert/encoder/layer/3/attention/self/query/kernel``. Works for nested dicts, lists, tuples,
dataclass-like nodes, and Flax NNX ``State`` (whose ``Variable`` nodes add a trailing ``.value``
attribute, dropped here so the name ends at the parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

KeyPath = tuple[Any, ...]


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def keypath_to_str(path: KeyPath) -> str:
    """Joins a JAX key path with ``/``; a trailing ``.value`` (an NNX ``Variable``) is dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    return "/".join(_key_name(k) for k in keys)


def leaf_names(tree: Any) -> list[str]:
    """The ``/``-joined name of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [keypath_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_name(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree.map`` whose function also receives each leaf's ``/``-joined name first."""
    return jax.tree_util.tree_map_with_path(
        lambda path, *leaves: fn(keypath_to_str(path), *leaves), tree, *rest
    )
