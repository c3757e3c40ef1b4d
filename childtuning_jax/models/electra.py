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
from childtuning_jax.models.blocks import (
    ACTIVATIONS,
    FrozenConfig,
    Key,
    dropout,
    linear,
    take,
)
from childtuning_jax.models.encoder import EncoderModel, check_config
from childtuning_jax.models.sequence_classifier import SequenceClassifier


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


class ElectraForSequenceClassification(SequenceClassifier):
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
    def backbone(self) -> EncoderModel:
        return self.electra

    def head_dropout(self) -> tuple[int, tuple[float, ...]]:
        return ElectraClassificationHead.num_keys, (self.classifier.rate,)

    def head(self, encoded: tuple[jax.Array, None], keys: Key) -> jax.Array:
        hidden, _ = encoded
        return self.classifier(hidden, keys)
