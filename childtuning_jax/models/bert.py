"""BERT for sequence classification (Devlin et al., 2019), as ``transformers``' PyTorch model.

Parameter names mirror ``BertForSequenceClassification``'s state dict: ``bert/embeddings/...``,
``bert/encoder/layer/N/...``, ``bert/pooler/dense/...``, ``classifier/...``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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


def classifier_dropout_rate(config: Any) -> float:
    """The head's dropout: ``classifier_dropout``, else ``hidden_dropout_prob`` (as HF)."""
    rate = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if rate is None else rate


class BertForSequenceClassification(nnx.Module):
    """BERT encoder, pooler (dense + tanh on ``[CLS]``), dropout and a linear classifier.

    ``config.num_labels == 1`` is regression (one score per example, e.g. STS-B).
    """

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_config(config)
        self.frozen_config = FrozenConfig(config)
        self.bert = EncoderModel(
            config, roberta_positions=False, add_pooling_layer=True, dtype=dtype, rngs=rngs
        )
        self.classifier = linear(config.hidden_size, config.num_labels, config, dtype, rngs)
        self.classifier_rate = classifier_dropout_rate(config)

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
        rate = self.classifier_rate
        n = self.bert.num_keys
        keys = dropout_keys(self.config, deterministic, dropout_rng, n + 1, (rate,))
        _, pooled = self.bert(
            input_ids, attention_mask, token_type_ids, take(keys, slice(0, n)), perturb_embeddings
        )
        logits = self.classifier(dropout(pooled, rate, take(keys, n)))
        return logits.astype(jnp.float32)
