"""BERT for sequence classification (Devlin et al., 2019), as ``transformers``' PyTorch model.

Parameter names mirror ``BertForSequenceClassification``'s state dict: ``bert/embeddings/...``,
``bert/encoder/layer/N/...``, ``bert/pooler/dense/...``, ``classifier/...``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.blocks import FrozenConfig, Key, dropout, linear, take
from childtuning_jax.models.encoder import EncoderModel, check_config
from childtuning_jax.models.sequence_classifier import SequenceClassifier


def classifier_dropout_rate(config: Any) -> float:
    """The head's dropout: ``classifier_dropout``, else ``hidden_dropout_prob`` (as HF)."""
    rate = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if rate is None else rate


class BertForSequenceClassification(SequenceClassifier):
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
    def backbone(self) -> EncoderModel:
        return self.bert

    def head_dropout(self) -> tuple[int, tuple[float, ...]]:
        return 1, (self.classifier_rate,)

    def head(self, encoded: tuple[jax.Array, jax.Array], keys: Key) -> jax.Array:
        _, pooled = encoded
        return self.classifier(dropout(pooled, self.classifier_rate, take(keys, 0)))
