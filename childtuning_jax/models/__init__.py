"""Flax NNX BERT and RoBERTa for sequence classification, weight for weight as ``transformers``.

``transformers`` 5 has no Flax models, so these are carried here; Hugging Face checkpoints load
with :func:`from_pretrained` and save back with :func:`save_pretrained`. Parameter names mirror
the PyTorch module names (``bert/encoder/layer/3/attention/self/query/kernel``), so Child-Tuning-D's
default eligibility rule (the name contains ``layer``) selects exactly the encoder layers.
"""

from childtuning_jax.models.bert import BertForSequenceClassification
from childtuning_jax.models.pretrained import (
    ARCHITECTURES,
    from_config,
    from_pretrained,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from childtuning_jax.models.roberta import RobertaForSequenceClassification

__all__ = [
    "ARCHITECTURES",
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "from_config",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "save_pretrained",
]
