"""XLNet for sequence classification (Yang et al., 2019), as ``transformers``' PyTorch model.

What fine-tuning a classifier runs: the content stream only (no query stream, no permutation
mask, no memory), bidirectional attention (``attn_type="bi"``) with Transformer-XL relative
positions and XLNet's relative segment encodings, post-LayerNorm residual blocks. The summary is
the hidden state of the LAST position (``summary_type="last"``) through a dense layer and tanh,
then ``logits_proj``. XLNet's tokenizer pads on the left, so the last position is the final real
token; with right padding it is a padding token (attending to the real tokens and itself), as in
PyTorch.

Parameter names mirror ``XLNetForSequenceClassification``'s state dict:
``transformer/word_embedding/embedding``, ``transformer/mask_emb`` (kept for checkpoints; unused
here), ``transformer/layer/N/rel_attn/{q,k,v,o,r,r_r_bias,r_s_bias,r_w_bias,seg_embed}``,
``transformer/layer/N/rel_attn/layer_norm/...``, ``transformer/layer/N/ff/{layer_1,layer_2,
layer_norm}/...``, ``sequence_summary/summary/...``, ``logits_proj/...``. The projections ``q``,
``k``, ``v``, ``o`` and ``r`` keep PyTorch's ``(d_model, n_head, d_head)`` layout (converted as
is, no transpose).

The attention mask marks padding with zeros (``attention_mask``, as BERT); a position may attend
to every non-padding position and to itself. ``token_type_ids=None`` drops the segment term
(PyTorch does the same), which differs from all-zero token types.

Dropout masks hash each element's index in the tensor as given (XLNet has no maximum length to
fix positions by, and pads on the left), so unlike the encoder models an XLNet run padded longer
(a run group's common length) draws other masks: XLNet groups with dropout on are not exact.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.blocks import (
    ACTIVATIONS,
    EmbeddingHook,
    FrozenConfig,
    Key,
    dropout,
    embedding,
    layer_norm,
    linear,
    lookup,
    take,
)
from childtuning_jax.models.sequence_classifier import SequenceClassifier

Array = jax.Array
SUMMARY_TYPES = ("last", "first", "mean")


def check_xlnet_config(config: Any) -> None:
    """Raises ``ValueError`` for an ``XLNetConfig`` this model cannot reproduce."""
    if config.d_model % config.n_head or config.d_head * config.n_head != config.d_model:
        raise ValueError(
            f"d_model={config.d_model} must equal n_head={config.n_head} * d_head={config.d_head}"
        )
    if config.ff_activation not in ACTIVATIONS:
        raise ValueError(
            f"Unsupported ff_activation={config.ff_activation!r}; supported: {sorted(ACTIVATIONS)}"
        )
    if config.attn_type != "bi":
        raise ValueError(f"Unsupported attn_type={config.attn_type!r}; only 'bi'")
    if config.bi_data:
        raise ValueError("bi_data=True (a pre-training option) is not supported")
    summary_type = getattr(config, "summary_type", "last")
    if summary_type not in SUMMARY_TYPES:
        raise ValueError(f"Unsupported summary_type={summary_type!r}; supported: {SUMMARY_TYPES}")
    if getattr(config, "summary_proj_to_labels", False):
        raise ValueError("summary_proj_to_labels=True is not supported (logits_proj follows)")
    activation = getattr(config, "summary_activation", None)
    if activation and activation not in ACTIVATIONS:
        raise ValueError(
            f"Unsupported summary_activation={activation!r}; supported: {sorted(ACTIVATIONS)}"
        )


def relative_position_encoding(length: int, d_model: int, clamp_len: int) -> Array:
    """Sinusoids of the relative distances ``length, length - 1, ..., 1 - length``, float32.

    Shape ``(2 * length, d_model)``: sines then cosines of ``distance / 10000**(2k / d_model)``.
    Row ``p`` encodes distance ``length - p``; ``clamp_len > 0`` clips distances to
    ``[-clamp_len, clamp_len]``.
    """
    inv_freq = 1.0 / jnp.power(10000.0, jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    distance = jnp.arange(length, -length, -1, dtype=jnp.float32)
    if clamp_len > 0:
        distance = jnp.clip(distance, -clamp_len, clamp_len)
    angles = distance[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rel_shift(scores: Array) -> Array:
    """Scores against relative positions -> scores against keys (Transformer-XL's shift).

    ``scores[..., i, p]`` (``p`` < ``2 * length``, row ``p`` of
    :func:`relative_position_encoding`) becomes ``out[..., i, j] = scores[..., i, length - i +
    j]``, the distance ``i - j`` of query ``i`` and key ``j``. A reshape and a slice, no gather.
    """
    *lead, length, positions = scores.shape
    shifted = scores.reshape(*lead, positions, length)[..., 1:, :]
    return shifted.reshape(*lead, length, positions - 1)[..., :length]


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
    return nnx.Param(nnx.initializers.normal(std)(rngs.params(), shape, jnp.float32))


class RelativeAttention(nnx.Module):
    """Relative multi-head attention, output projection, residual and LayerNorm (HF ``rel_attn``).

    Scores add three terms before scaling by ``d_head**-0.5``: content (query + ``r_w_bias``
    against keys), position (query + ``r_r_bias`` against the projected relative encodings,
    shifted to keys) and segment (query + ``r_s_bias`` against ``seg_embed[same/different]``).
    Scores and softmax are float32.
    """

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        d_model, n_head, d_head = config.d_model, config.n_head, config.d_head
        std = config.initializer_range
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, _normal(rngs, (d_model, n_head, d_head), std))
        self.r_r_bias = _normal(rngs, (n_head, d_head), std)
        self.r_s_bias = _normal(rngs, (n_head, d_head), std)
        self.r_w_bias = _normal(rngs, (n_head, d_head), std)
        self.seg_embed = _normal(rngs, (2, n_head, d_head), std)
        self.layer_norm = layer_norm(config, dtype, rngs)
        self.scale = 1.0 / math.sqrt(d_head)
        self.rate = config.dropout
        self.dtype = dtype

    num_keys = 2  # dropout sites: attention probabilities, output

    def __call__(
        self, h: Array, pos: Array, seg_diff: Array | None, mask: Array | None, keys: Key
    ) -> Array:
        """``h`` (batch, length, d_model); ``pos`` (2 * length, d_model), or per example
        (batch, 2 * length, d_model); ``seg_diff`` (batch, length, length), True where query and
        key segments differ; ``mask`` (batch, 1, length, length), True where attention is
        allowed."""
        w = lambda p: p[...].astype(self.dtype)
        f32 = jnp.float32
        q = jnp.einsum("bih,hnd->bind", h, w(self.q))
        k = jnp.einsum("bjh,hnd->bjnd", h, w(self.k))
        v = jnp.einsum("bjh,hnd->bjnd", h, w(self.v))
        q_pos = q + w(self.r_r_bias)
        if pos.ndim == 2:
            k_pos = jnp.einsum("ph,hnd->pnd", pos, w(self.r))
            bd = jnp.einsum("bind,pnd->bnip", q_pos, k_pos, preferred_element_type=f32)
        else:
            k_pos = jnp.einsum("bph,hnd->bpnd", pos, w(self.r))
            bd = jnp.einsum("bind,bpnd->bnip", q_pos, k_pos, preferred_element_type=f32)
        ac = jnp.einsum("bind,bjnd->bnij", q + w(self.r_w_bias), k, preferred_element_type=f32)
        scores = ac + rel_shift(bd)
        if seg_diff is not None:
            q_seg = q + w(self.r_s_bias)
            ef = jnp.einsum("bind,snd->bnis", q_seg, w(self.seg_embed), preferred_element_type=f32)
            scores = scores + jnp.where(seg_diff[:, None], ef[..., 1:], ef[..., :1])
        scores = scores * jnp.float32(self.scale)
        if mask is not None:
            # PyTorch subtracts 1e30 at masked positions, which in float32 gives exactly -1e30.
            scores = jnp.where(mask, scores, jnp.float32(-1e30))
        probs = dropout(jax.nn.softmax(scores, axis=-1), self.rate, take(keys, 0))
        attended = jnp.einsum("bnij,bjnd->bind", probs.astype(v.dtype), v)
        out = jnp.einsum("bind,hnd->bih", attended, w(self.o))
        return self.layer_norm(dropout(out, self.rate, take(keys, 1)) + h)


class FeedForward(nnx.Module):
    """``layer_1``, activation, dropout, ``layer_2``, dropout, residual, LayerNorm (HF ``ff``)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.layer_norm = layer_norm(config, dtype, rngs)
        self.layer_1 = linear(config.d_model, config.d_inner, config, dtype, rngs)
        self.layer_2 = linear(config.d_inner, config.d_model, config, dtype, rngs)
        self.activation = config.ff_activation
        self.rate = config.dropout

    num_keys = 2

    def __call__(self, x: Array, keys: Key) -> Array:
        out = dropout(ACTIVATIONS[self.activation](self.layer_1(x)), self.rate, take(keys, 0))
        out = dropout(self.layer_2(out), self.rate, take(keys, 1))
        return self.layer_norm(out + x)


class Layer(nnx.Module):
    """One XLNet layer (HF ``layer.N``): relative attention, then the feed-forward block."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.rel_attn = RelativeAttention(config, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(config, dtype=dtype, rngs=rngs)

    num_keys = RelativeAttention.num_keys + FeedForward.num_keys

    def __call__(
        self, h: Array, pos: Array, seg_diff: Array | None, mask: Array | None, keys: Key
    ) -> Array:
        h = self.rel_attn(h, pos, seg_diff, mask, take(keys, slice(0, 2)))
        return self.ff(h, take(keys, slice(2, 4)))


class XLNetModel(nnx.Module):
    """Word embeddings and the layer stack (HF ``XLNetModel``, content stream, no memory)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.word_embedding = embedding(config.vocab_size, config, dtype, rngs, None)
        self.mask_emb = _normal(rngs, (1, 1, config.d_model), config.initializer_range)
        self.layer = nnx.List(
            [Layer(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layer)]
        )
        self.d_model = config.d_model
        self.clamp_len = config.clamp_len
        self.rate = config.dropout
        # Dropout sites: word embeddings, relative encodings, each layer's, the output.
        self.num_keys = 3 + Layer.num_keys * config.n_layer

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        token_type_ids: Array | None,
        keys: Key,
        perturb_embeddings: EmbeddingHook | None = None,
    ) -> Array:
        """The last hidden states (batch, length, d_model).

        ``keys``: ``self.num_keys`` dropout keys, or ``None`` in evaluation.
        ``perturb_embeddings``: applied to the word-embedding lookup, before its dropout.
        """
        batch, length = input_ids.shape
        words = lookup(self.word_embedding, input_ids)
        if perturb_embeddings is not None:
            words = perturb_embeddings(words)
        h = dropout(words, self.rate, take(keys, 0))
        pos = relative_position_encoding(length, self.d_model, self.clamp_len)
        pos_key = take(keys, 1)
        if pos_key is not None and self.rate > 0.0:
            # PyTorch drops the encodings after expanding them over the batch: a mask per example.
            pos = dropout(jnp.broadcast_to(pos, (batch, *pos.shape)), self.rate, pos_key)
        pos = pos.astype(h.dtype)
        seg_diff = None
        if token_type_ids is not None:
            seg_diff = token_type_ids[:, :, None] != token_type_ids[:, None, :]
        mask = None
        if attention_mask is not None:
            allowed = (attention_mask != 0)[:, None, :] | jnp.eye(length, dtype=bool)
            mask = allowed[:, None]  # (batch, heads=1, query, key)
        n = Layer.num_keys
        for i, layer in enumerate(self.layer):
            h = layer(h, pos, seg_diff, mask, take(keys, slice(2 + n * i, 2 + n * (i + 1))))
        return dropout(h, self.rate, take(keys, self.num_keys - 1))


class SequenceSummary(nnx.Module):
    """One vector per sequence (HF ``sequence_summary``): the last (or first, or mean) hidden
    state, dropout, the ``summary`` projection, its activation (tanh) and dropout."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        use_proj = getattr(config, "summary_use_proj", False)
        self.summary = (
            linear(config.d_model, config.d_model, config, dtype, rngs) if use_proj else None
        )
        self.summary_type = getattr(config, "summary_type", "last")
        self.activation = getattr(config, "summary_activation", None) or None
        self.first_rate = float(getattr(config, "summary_first_dropout", 0.0) or 0.0)
        self.last_rate = float(getattr(config, "summary_last_dropout", 0.0) or 0.0)

    num_keys = 2

    def __call__(self, hidden: Array, keys: Key) -> Array:
        if self.summary_type == "last":
            x = hidden[:, -1]
        elif self.summary_type == "first":
            x = hidden[:, 0]
        else:  # "mean", over every position (padding included), as PyTorch
            x = jnp.mean(hidden, axis=1)
        x = dropout(x, self.first_rate, take(keys, 0))
        if self.summary is not None:
            x = self.summary(x)
        if self.activation is not None:
            x = ACTIVATIONS[self.activation](x)
        return dropout(x, self.last_rate, take(keys, 1))


class XLNetForSequenceClassification(SequenceClassifier):
    """XLNet, sequence summary and ``logits_proj``; ``config.num_labels == 1`` is regression."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_xlnet_config(config)
        self.frozen_config = FrozenConfig(config)
        self.transformer = XLNetModel(config, dtype=dtype, rngs=rngs)
        self.sequence_summary = SequenceSummary(config, dtype=dtype, rngs=rngs)
        self.logits_proj = linear(config.d_model, config.num_labels, config, dtype, rngs)

    @property
    def backbone(self) -> XLNetModel:
        return self.transformer

    def head_dropout(self) -> tuple[int, tuple[float, ...]]:
        summary = self.sequence_summary
        return SequenceSummary.num_keys, (
            self.transformer.rate,
            summary.first_rate,
            summary.last_rate,
        )

    def head(self, hidden: jax.Array, keys: Key) -> jax.Array:
        return self.logits_proj(self.sequence_summary(hidden, keys))
