"""The tiny BERT the trainer's unit tests share: two layers, hidden 16, vocabulary 50, no dropout
(a few seconds of XLA compilation on CPU, exact to compare)."""

import transformers
from flax import nnx

from childtuning_jax.models import from_config
from childtuning_trainer.objective import Model


def tiny_bert_config(num_layers: int = 2) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_model(num_labels: int = 2, num_layers: int = 2) -> tuple[Model, nnx.State]:
    """``(Model, params)`` of a freshly initialised tiny BERT (seed 0)."""
    module = from_config(tiny_bert_config(num_layers), num_labels=num_labels, seed=0)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest, num_labels), params
