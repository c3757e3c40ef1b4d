"""ELECTRA for sequence classification (Clark et al., 2020), as ``transformers``' PyTorch model.

The discriminator is BERT's encoder behind embeddings of their own width (``embedding_size``),
projected to ``hidden_size`` by ``embeddings_project`` when the two differ; there is no pooler.
Parameter names mirror ``ElectraForSequenceClassification``'s state dict:
``electra/embeddings/...``, ``electra/embeddings_project/...``, ``electra/encoder/layer/N/...``,
``classifier/dense/...``, ``classifier/out_proj/...``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.bert import classifier_dropout_rate
from childtuning_jax.models.encoder import (
    ACTIVATIONS,
    EmbeddingHook,
    EncoderModel,
    FrozenConfig,
    check_config,
    dropout,
    dropout_keys,
    linear,
    take,
)


class ElectraClassificationHead(nnx.Module):
    """Dropout, dense + GELU, dropout and ``out_proj`` on the first token (HF head).

    GELU (exact, erf) where BERT's pooler has tanh, as the ELECTRA authors' code.
    """

    def __init__(self, config: Any, *, dtype: Any, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.hidden_size, config, dtype, rngs)
        self.out_proj = linear(config.hidden_size, config.num_labels, config, dtype, rngs)
        self.rate = classifier_dropout_rate(config)

    num_keys = 2

    def __call__(self, hidden: jax.Array, keys: jax.Array | None) -> jax.Array:
        x = dropout(hidden[:, 0], self.rate, take(keys, 0))
        x = ACTIVATIONS["gelu"](self.dense(x))
        return self.out_proj(dropout(x, self.rate, take(keys, 1)))


class ElectraForSequenceClassification(nnx.Module):
    """ELECTRA discriminator and classification head; ``config.num_labels == 1`` is regression."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_config(config)
        self.frozen_config = FrozenConfig(config)
        self.electra = EncoderModel(
            config,
            roberta_positions=False,
            add_pooling_layer=False,
            dtype=dtype,
            rngs=rngs,
            embedding_size=config.embedding_size,
        )
        self.classifier = ElectraClassificationHead(config, dtype=dtype, rngs=rngs)

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
        ``perturb_embeddings`` maps the word-embedding lookup ``(batch, seq, embedding_size)``
        before positions and token types are added and before the projection to
        ``hidden_size``; ``None`` leaves it unchanged.
        """
        n = self.electra.num_keys
        num = n + ElectraClassificationHead.num_keys
        keys = dropout_keys(self.config, deterministic, dropout_rng, num, (self.classifier.rate,))
        hidden, _ = self.electra(
            input_ids, attention_mask, token_type_ids, take(keys, slice(0, n)), perturb_embeddings
        )
        return self.classifier(hidden, take(keys, slice(n, None))).astype(jnp.float32)
