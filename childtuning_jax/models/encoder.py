"""The Transformer encoder shared by BERT, RoBERTa and ELECTRA, written as Flax NNX modules.

Module and attribute names mirror Hugging Face ``transformers`` (``encoder/layer/3/attention/self/
query``), so parameter names read like PyTorch state-dict keys and the official Child-Tuning-D
eligibility rule (the name contains ``layer``) selects exactly the encoder layers. The pieces
(initialisation, dropout with explicit keys) are those of :mod:`childtuning_jax.models.blocks`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.blocks import (
    ACTIVATIONS,
    Array,
    EmbeddingHook,
    Key,
    canonical_length,
    dropout,
    embedding,
    layer_norm,
    linear,
    lookup,
    take,
)


def check_config(config: Any) -> None:
    """Raises ``ValueError`` for a ``transformers`` config this encoder cannot reproduce."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"Unsupported hidden_act={config.hidden_act!r}; supported: {sorted(ACTIVATIONS)}"
        )
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise ValueError(f"Unsupported position_embedding_type={kind!r}; only 'absolute'")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("Decoder / cross-attention configs are not supported (encoder only)")


class Embeddings(nnx.Module):
    """Word + absolute position + token-type embeddings, LayerNorm and dropout.

    ``roberta_positions=True`` numbers positions as RoBERTa does: from ``pad_token_id + 1``,
    skipping padding tokens (which get position ``pad_token_id``). ``features`` is the embedding
    width, ``hidden_size`` unless given (ELECTRA's ``embedding_size``).
    """

    def __init__(
        self,
        config: Any,
        *,
        roberta_positions: bool,
        dtype: Any,
        rngs: nnx.Rngs,
        features: int | None = None,
    ):
        pad = config.pad_token_id
        size = features or config.hidden_size
        self.word_embeddings = embedding(config.vocab_size, config, dtype, rngs, pad, size)
        self.position_embeddings = embedding(
            config.max_position_embeddings,
            config,
            dtype,
            rngs,
            pad if roberta_positions else None,
            size,
        )
        self.token_type_embeddings = embedding(
            config.type_vocab_size, config, dtype, rngs, None, size
        )
        self.LayerNorm = layer_norm(config, dtype, rngs, size)
        self.roberta_positions = roberta_positions
        self.pad_token_id = pad
        self.max_positions = config.max_position_embeddings
        self.rate = config.hidden_dropout_prob
        self.seq_len = canonical_length(config)  # dropout masks by position, not padded length

    def position_ids(self, input_ids: Array) -> Array:
        length = input_ids.shape[1]
        if self.roberta_positions:
            last = length + self.pad_token_id
            if last >= self.max_positions:
                raise ValueError(
                    f"Sequence length {length} needs position {last}, beyond "
                    f"max_position_embeddings={self.max_positions}"
                )
            not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
        if length > self.max_positions:
            raise ValueError(
                f"Sequence length {length} exceeds max_position_embeddings={self.max_positions}"
            )
        return jnp.broadcast_to(jnp.arange(length), input_ids.shape)

    def positions(self, input_ids: Array) -> Array:
        """The position embeddings of ``input_ids``; absolute positions 0, 1, ... are one slice
        of the table (broadcast over the batch: their gradient is a sum, not a scatter)."""
        table = self.position_embeddings
        if self.roberta_positions:
            return lookup(table, self.position_ids(input_ids))
        self.position_ids(input_ids)  # checks the length
        rows = table.embedding[...][: input_ids.shape[1]]
        return rows.astype(table.dtype or rows.dtype)[None]

    def __call__(
        self,
        input_ids: Array,
        token_type_ids: Array | None,
        key: Key,
        perturb_embeddings: EmbeddingHook | None = None,
    ) -> Array:
        """``perturb_embeddings`` maps the word embeddings alone, before the sum and LayerNorm."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        words = lookup(self.word_embeddings, input_ids)
        if perturb_embeddings is not None:
            words = perturb_embeddings(words)
        types = lookup(self.token_type_embeddings, token_type_ids)
        x = words + types + self.positions(input_ids)
        return dropout(self.LayerNorm(x), self.rate, key, (1,), self.seq_len)


class SelfAttention(nnx.Module):
    """Multi-head self-attention projections and the attention itself (HF ``attention.self``).

    Without attention dropout (evaluation, or a zero rate) attention goes through
    ``jax.nn.dot_product_attention``, which XLA may lower to a fused kernel on GPU. With
    attention-probability dropout in training (which that function lacks) the probabilities are
    computed explicitly (softmax in float32) and dropped as ``transformers`` does.
    """

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.query = linear(hidden, hidden, config, dtype, rngs)
        self.key = linear(hidden, hidden, config, dtype, rngs)
        self.value = linear(hidden, hidden, config, dtype, rngs)
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // config.num_attention_heads
        self.rate = config.attention_probs_dropout_prob
        self.seq_len = canonical_length(config)

    def __call__(self, x: Array, mask: Array, key: Key) -> Array:
        batch, length, _ = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if key is None or self.rate == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            # Scores in the compute dtype, then float32 for the softmax (as autocast does): a
            # float32 product would make the backward's two score matmuls float32 as well.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32)
            logits = jnp.where(mask, logits / math.sqrt(self.head_dim), jnp.finfo(jnp.float32).min)
            # Softmax in float32, dropout on the probabilities in the compute dtype (half the
            # memory traffic of the largest activation in bfloat16).
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (batch, heads, query, key)
            probs = dropout(probs, self.rate, key, (2, 3), self.seq_len)
            out = jnp.einsum("bnts,bsnh->btnh", probs, v)
        return out.reshape(batch, length, self.num_heads * self.head_dim)


class DenseOutput(nnx.Module):
    """Dense, dropout, residual add and LayerNorm (HF ``attention.output`` and ``output``)."""

    def __init__(self, n_in: int, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = linear(n_in, config.hidden_size, config, dtype, rngs)
        self.LayerNorm = layer_norm(config, dtype, rngs)
        self.rate = config.hidden_dropout_prob
        self.seq_len = canonical_length(config)

    def __call__(self, x: Array, residual: Array, key: Key) -> Array:
        dropped = dropout(self.dense(x), self.rate, key, (1,), self.seq_len)
        return self.LayerNorm(dropped + residual)


class Attention(nnx.Module):
    """Self-attention followed by its output block (HF ``attention``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.self = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.output = DenseOutput(config.hidden_size, config, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Array, keys: Key) -> Array:
        return self.output(self.self(x, mask, take(keys, 0)), x, take(keys, 1))


class Intermediate(nnx.Module):
    """The feed-forward expansion and activation (HF ``intermediate``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.intermediate_size, config, dtype, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array) -> Array:
        return ACTIVATIONS[self.hidden_act](self.dense(x))


class Layer(nnx.Module):
    """One post-LayerNorm Transformer encoder layer (HF ``encoder.layer.N``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.attention = Attention(config, dtype=dtype, rngs=rngs)
        self.intermediate = Intermediate(config, dtype=dtype, rngs=rngs)
        self.output = DenseOutput(config.intermediate_size, config, dtype=dtype, rngs=rngs)

    num_keys = 3  # dropout sites: attention probabilities, attention output, output

    def __call__(self, x: Array, mask: Array, keys: Key) -> Array:
        x = self.attention(x, mask, take(keys, slice(0, 2)))
        return self.output(self.intermediate(x), x, take(keys, 2))


class Encoder(nnx.Module):
    """The stack of ``num_hidden_layers`` layers (HF ``encoder``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [Layer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: Array, attention_mask: Array, keys: Key) -> Array:
        """``keys``: ``Layer.num_keys`` dropout keys per layer, layer after layer."""
        # (batch, seq) -> (batch, heads=1, query=1, key=seq), True where attention is allowed.
        mask = (attention_mask != 0)[:, None, None, :]
        n = Layer.num_keys
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, take(keys, slice(n * i, n * (i + 1))))
        return x


class Pooler(nnx.Module):
    """Dense + tanh on the first token (HF BERT ``pooler``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.hidden_size, config, dtype, rngs)

    def __call__(self, hidden: Array) -> Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class EncoderModel(nnx.Module):
    """Embeddings + encoder (+ BERT's pooler): HF ``BertModel`` / ``RobertaModel`` /
    ``ElectraModel``.

    ``embedding_size`` (ELECTRA) gives the embeddings their own width; when it differs from
    ``hidden_size``, ``embeddings_project`` (a linear layer) maps them to the encoder's width.
    """

    def __init__(
        self,
        config: Any,
        *,
        roberta_positions: bool,
        add_pooling_layer: bool,
        dtype: Any,
        rngs: nnx.Rngs,
        embedding_size: int | None = None,
    ):
        size = embedding_size or config.hidden_size
        self.embeddings = Embeddings(
            config, roberta_positions=roberta_positions, dtype=dtype, rngs=rngs, features=size
        )
        self.embeddings_project = (
            linear(size, config.hidden_size, config, dtype, rngs)
            if size != config.hidden_size
            else None
        )
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.pooler = Pooler(config, dtype=dtype, rngs=rngs) if add_pooling_layer else None
        self.num_keys = 1 + Layer.num_keys * config.num_hidden_layers

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        token_type_ids: Array | None,
        keys: Key,
        perturb_embeddings: EmbeddingHook | None = None,
    ) -> tuple[Array, Array | None]:
        """Returns the last hidden states and, with a pooler, the pooled first token.

        ``keys``: ``self.num_keys`` dropout keys, or ``None`` in evaluation.
        ``perturb_embeddings``: applied to the word-embedding lookup (see :class:`Embeddings`).
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, take(keys, 0), perturb_embeddings)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        x = self.encoder(x, attention_mask, take(keys, slice(1, None)))
        return x, None if self.pooler is None else self.pooler(x)
