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
from childtuning_jax.models.blocks import (
    FrozenConfig,
    Key,
    dropout,
    linear,
    take,
)
from childtuning_jax.models.encoder import EncoderModel, check_config
from childtuning_jax.models.sequence_classifier import SequenceClassifier


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


class RobertaForSequenceClassification(SequenceClassifier):
    """RoBERTa encoder and classification head; ``config.num_labels == 1`` is regression."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_config(config)
        self.frozen_config = FrozenConfig(config)
        self.roberta = EncoderModel(
            config, roberta_positions=True, add_pooling_layer=False, dtype=dtype, rngs=rngs
        )
        self.classifier = RobertaClassificationHead(config, dtype=dtype, rngs=rngs)

    @property
    def backbone(self) -> EncoderModel:
        return self.roberta

    def head_dropout(self) -> tuple[int, tuple[float, ...]]:
        return RobertaClassificationHead.num_keys, (self.classifier.rate,)

    def head(self, encoded: tuple[jax.Array, None], keys: Key) -> jax.Array:
        hidden, _ = encoded
        return self.classifier(hidden, keys)
