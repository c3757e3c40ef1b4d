"""The pieces every model here is built from, as ``transformers`` builds its PyTorch models.

Parameters are float32; ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``). Dropout holds no
hidden RNG state: every call takes an explicit ``dropout_rng`` key (``None`` = evaluation), split
once into one key per dropout site (:func:`dropout_keys`, :func:`take`), so a model split with
``nnx.split`` stays a pure function under ``jax.jit`` and ``jax.pmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax import hash_random

Array = jax.Array
Key = jax.Array | None
# Maps the word-embedding lookup (batch, seq, features) to a perturbed one of the same shape.
EmbeddingHook = Callable[[Array], Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as torch
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


class FrozenConfig:
    """A ``transformers`` config held as a static, hashable NNX attribute.

    ``transformers`` configs define ``__eq__`` but no hash, and NNX graph definitions (the static
    half of ``nnx.split``, keys of ``nnx.jit``'s cache) must hash. Equality and hash follow the
    config's JSON at construction; treat the config as read-only afterwards.
    """

    __slots__ = ("config", "_json")

    def __init__(self, config: Any):
        self.config = config
        self._json = config.to_json_string(use_diff=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrozenConfig) and self._json == other._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"FrozenConfig({type(self.config).__name__})"


def take(keys: Key, index: int | slice) -> Key:
    """``keys[index]``; ``None`` (evaluation) stays ``None``.

    A call splits its ``dropout_rng`` once into one key per dropout site (one PRNG call, cheaper
    to compile than a key derivation per site) and hands each module the keys of its sites.
    """
    return None if keys is None else keys[index]


def dropout(
    x: Array, rate: float, key: Key, seq_axes: tuple[int, ...] = (), seq_len: int | None = None
) -> Array:
    """Inverted dropout, as ``torch.nn.Dropout`` in training; identity when ``key`` is ``None``.

    The mask comes from :func:`childtuning_jax.hash_random.bernoulli` (one hash per element, fused
    into the scaling) rather than per-element threefry, which is a noticeable share of a training
    step. Each element is kept with probability ``1 - rate`` within 2**-32.

    ``seq_axes`` and ``seq_len`` (:func:`canonical_length`): the sequence axes of ``x`` and a
    fixed length for them. Each element is then hashed by its index in ``x``'s shape with those
    axes ``seq_len`` long, so its mask depends on its position (row, head, query, key, feature)
    alone: ``x`` padded with more positions at the end of a sequence axis gets the same mask on
    its original positions (a run in a group, padded to the group's length, drops as alone).
    Without them, or when that index space reaches 2**32 elements (very large batches), the
    index is the position in ``x`` itself, which changes with the padded length.
    """
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    index_shape = x.shape
    if seq_len is not None:
        axes = {axis % x.ndim for axis in seq_axes}
        canonical = tuple(max(n, seq_len) if a in axes else n for a, n in enumerate(x.shape))
        if math.prod(canonical) < hash_random.UINT32_RANGE:
            index_shape = canonical
    if x.size < hash_random.UINT32_RANGE:
        keep = hash_random.bernoulli(key, 1.0 - rate, x.shape, index_shape)
    else:  # beyond the hash's 32-bit index
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def canonical_length(config: Any) -> int | None:
    """The fixed sequence length dropout hashes positions in (:func:`dropout`): the model's
    ``max_position_embeddings``, or ``None`` where it has no such bound (XLNet: -1 or absent)."""
    length = getattr(config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def linear(n_in: int, n_out: int, config: Any, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    """``nn.Linear`` as Hugging Face initialises it: N(0, initializer_range) weight, zero bias."""
    return nnx.Linear(
        n_in,
        n_out,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def layer_norm(
    config: Any, dtype: Any, rngs: nnx.Rngs, features: int | None = None
) -> nnx.LayerNorm:
    """``nn.LayerNorm`` over ``features`` (default ``hidden_size``) with ``layer_norm_eps``."""
    # Two-pass variance, as torch (Flax's default E[x^2] - E[x]^2 loses precision).
    return nnx.LayerNorm(
        features or config.hidden_size,
        epsilon=config.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def embedding(
    num: int,
    config: Any,
    dtype: Any,
    rngs: nnx.Rngs,
    padding_idx: int | None,
    features: int | None = None,
) -> nnx.Embed:
    """``nn.Embedding`` as Hugging Face initialises it (the padding row, if any, is zero).

    ``features`` defaults to ``hidden_size`` (ELECTRA's embeddings have their own size).
    """
    embed = nnx.Embed(
        num,
        features or config.hidden_size,
        embedding_init=nnx.initializers.normal(config.initializer_range),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )
    if padding_idx is not None and 0 <= padding_idx < num:
        embed.embedding[...] = embed.embedding[...].at[padding_idx].set(0.0)
    return embed


SELECT_MAX_ROWS = 16  # tables this small (token types) are looked up by selection


def lookup(embed: nnx.Embed, ids: Array) -> Array:
    """``embed(ids)``, the same values, with a float32 gradient and no cast of the whole table.

    ``nnx.Embed`` casts its whole table to the compute dtype and gathers from the copy, so with
    bfloat16 compute the gradient is a bfloat16 scatter-add over the whole table (thousands of
    bfloat16 additions into each token-type row). Here the rows are gathered from the float32
    table and then cast; a table of at most :data:`SELECT_MAX_ROWS` rows is read by selection,
    so its gradient is a float32 sum rather than a scatter.
    """
    table = embed.embedding[...]
    if table.shape[0] <= SELECT_MAX_ROWS:
        rows = jnp.where((ids == 0)[..., None], table[0], 0.0)
        for row in range(1, table.shape[0]):
            rows = rows + jnp.where((ids == row)[..., None], table[row], 0.0)
    else:
        rows = jnp.take(table, ids, axis=0)
    return rows.astype(embed.dtype or table.dtype)


def dropout_keys(
    config: Any, deterministic: bool, dropout_rng: Key, num: int, rates: tuple[float, ...] = ()
) -> Key:
    """``num`` dropout keys split from ``dropout_rng`` for one call; ``None`` in evaluation mode.

    Raises ``ValueError`` in training mode (``deterministic=False``) without ``dropout_rng`` when
    any dropout rate is non-zero: the config's ``hidden_dropout_prob`` and
    ``attention_probs_dropout_prob`` (where it has them) or one of ``rates``.
    """
    if deterministic:
        return None
    config_rates = (
        getattr(config, "hidden_dropout_prob", 0.0),
        getattr(config, "attention_probs_dropout_prob", 0.0),
    )
    active = max((*config_rates, *rates))
    if dropout_rng is None:
        if active > 0.0:
            raise ValueError("deterministic=False needs a dropout_rng key (dropout is active)")
        return None
    return jax.random.split(dropout_rng, num)
