"""Flax NNX BERT, RoBERTa, ELECTRA and XLNet for sequence classification, as ``transformers``.

``transformers`` 5 has no Flax models, so these are carried here; Hugging Face checkpoints load
with :func:`from_pretrained` and save back with :func:`save_pretrained`. Parameter names mirror
the PyTorch module names (``bert/encoder/layer/3/attention/self/query/kernel``,
``transformer/layer/3/rel_attn/q``), so Child-Tuning-D's default eligibility rule (the name
contains ``layer``) selects exactly the encoder layers.

Every model is a :class:`~childtuning_jax.models.sequence_classifier.SequenceClassifier`: called
as ``model(input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True,
dropout_rng=None, perturb_embeddings=None)``, it returns float32 logits ``(batch, num_labels)``.
"""

from childtuning_jax.models.bert import BertForSequenceClassification
from childtuning_jax.models.electra import ElectraForSequenceClassification
from childtuning_jax.models.pretrained import (
    ARCHITECTURES,
    dropout_overrides,
    from_config,
    from_pretrained,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from childtuning_jax.models.roberta import RobertaForSequenceClassification
from childtuning_jax.models.xlnet import XLNetForSequenceClassification

__all__ = [
    "ARCHITECTURES",
    "BertForSequenceClassification",
    "ElectraForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLNetForSequenceClassification",
    "dropout_overrides",
    "from_config",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "save_pretrained",
]
