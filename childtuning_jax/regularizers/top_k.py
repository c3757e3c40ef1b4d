"""Top-K layer fine-tuning: a fixed mask that trains only the last K encoder layers and the head.

A baseline for ChildTuning-D (Xu et al., 2021, compare their layer-wise baselines): instead of a
Fisher-selected child network spread over all layers, the child network is the top K encoder
layers. The mask has the form of :func:`childtuning_jax.fisher_mask`'s output, so
``child_tuning_d(top_k_layers_mask(params, k))`` trains exactly those parameters. With AdamW's
weight decay, leave the frozen leaves out of its decay mask as well, or they shrink (PyTorch's
``requires_grad=False`` leaves them untouched).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from childtuning_jax import paths

_LAYER = re.compile(r"(?:^|/)layer/(\d+)(?:/|$)")


def layer_index(name: str) -> int | None:
    """The ``N`` of the first ``layer/N`` path component pair in ``name``, or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_embedding(name: str) -> bool:
    """True when a path component contains ``emb`` (case-insensitive): ``embeddings``,
    ``word_embedding``, XLNet's ``mask_emb``, ELECTRA's ``embeddings_project``."""
    return any("emb" in part.lower() for part in name.split("/"))


def top_k_layers_mask(params: Any, k: int) -> Any:
    """A boolean mask that trains the top ``k`` encoder layers, the pooler and the head.

    The rule, on each leaf's ``/``-joined name (:func:`childtuning_jax.leaf_names`):

    * a leaf with a ``layer/N`` component (``bert/encoder/layer/3/...``,
      ``roberta/encoder/layer/N/...``, ``electra/encoder/layer/N/...``, XLNet's
      ``transformer/layer/N/...``) belongs to layer ``N``; it is True iff ``N`` is among the ``k``
      largest layer indices present;
    * any other leaf is False if a path component contains ``emb`` (the embeddings and their
      LayerNorm, XLNet's ``word_embedding`` and ``mask_emb``, ELECTRA's ``embeddings_project``),
      else True (the pooler, ``classifier``, XLNet's ``sequence_summary`` and ``logits_proj``).

    Args:
      params: the model's params (any pytree, e.g. an NNX ``State``); only names and shapes are
        read.
      k: how many of the top encoder layers to train, in ``1..num_layers``.

    Returns:
      A pytree with the structure of ``params`` holding one boolean array per leaf, of the leaf's
      shape, each all True or all False, as :func:`childtuning_jax.child_tuning_d` takes it.

    Raises:
      ValueError: ``k`` outside ``1..num_layers``, or no leaf name has a ``layer/N`` component.
      TypeError: ``k`` is not an integer.
    """
    try:
        if isinstance(k, bool | np.bool_):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {k!r}") from None
    indices = sorted({i for i in map(layer_index, paths.leaf_names(params)) if i is not None})
    num_layers = len(indices)
    if num_layers == 0:
        raise ValueError(
            f"k={k} but num_layers=0: no leaf name has a 'layer/N' component "
            "(expected names like 'bert/encoder/layer/3/attention/self/query/kernel')"
        )
    if not 1 <= k <= num_layers:
        raise ValueError(f"k must be in 1..num_layers={num_layers}, got k={k}")
    first_trained = indices[-k]

    def build(name: str, leaf: Any) -> Any:
        index = layer_index(name)
        train = index >= first_trained if index is not None else not is_embedding(name)
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
        return jnp.full(shape, train, dtype=bool)

    return paths.map_with_name(build, params)
