"""RoBERTa for sequence classification (Liu et al., 2019), as ``transformers``' PyTorch model.

Parameter names mirror ``RobertaForSequenceClassification``'s state dict: ``roberta/embeddings/...``
(positions start after the padding index and skip padding), ``roberta/encoder/layer/N/...``,
``classifier/dense/...``, ``classifier/out_proj/...``. There is no pooler, as in HF.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.bert import classifier_dropout_rate
from childtuning_jax.models.encoder import (
    EmbeddingHook,
    EncoderModel,
    FrozenConfig,
    check_config,
    dropout,
    dropout_keys,
    linear,
    take,
)


class RobertaClassificationHead(nnx.Module):
    """Dropout, dense + tanh, dropout and ``out_proj`` on the first token ``<s>`` (HF head)."""

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.hidden_size, config, dtype, rngs)
        self.out_proj = linear(config.hidden_size, config.num_labels, config, dtype, rngs)
        self.rate = classifier_dropout_rate(config)

    num_keys = 2

    def __call__(self, hidden: jax.Array, keys: jax.Array | None) -> jax.Array:
        x = dropout(hidden[:, 0], self.rate, take(keys, 0))
        x = jnp.tanh(self.dense(x))
        return self.out_proj(dropout(x, self.rate, take(keys, 1)))


class RobertaForSequenceClassification(nnx.Module):
    """RoBERTa encoder and classification head; ``config.num_labels == 1`` is regression."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_config(config)
        self.frozen_config = FrozenConfig(config)
        self.roberta = EncoderModel(
            config, roberta_positions=True, add_pooling_layer=False, dtype=dtype, rngs=rngs
        )
        self.classifier = RobertaClassificationHead(config, dtype=dtype, rngs=rngs)

    @property
    def config(self) -> Any:
        """The ``transformers`` config (read-only)."""
        return self.frozen_config.config

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        perturb_embeddings: EmbeddingHook | None = None,
    ) -> jax.Array:
        """Float32 logits of shape ``(batch, num_labels)``.

        Training mode is ``deterministic=False`` with an explicit ``dropout_rng`` key.
        ``perturb_embeddings`` maps the word-embedding lookup ``(batch, seq, hidden)`` before
        positions and token types are added (e.g. R3F's noise); ``None`` leaves it unchanged.
        """
        n = self.roberta.num_keys
        num = n + RobertaClassificationHead.num_keys
        keys = dropout_keys(self.config, deterministic, dropout_rng, num, (self.classifier.rate,))
        hidden, _ = self.roberta(
            input_ids, attention_mask, token_type_ids, take(keys, slice(0, n)), perturb_embeddings
        )
        return self.classifier(hidden, take(keys, slice(n, None))).astype(jnp.float32)
