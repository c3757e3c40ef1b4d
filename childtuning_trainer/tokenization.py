"""Turning examples into model inputs with a ``transformers`` fast tokenizer.

Every example is padded (and truncated, longest text first) to ``max_seq_length`` on the
tokenizer's own padding side; the input pipeline then cuts each batch to its bucket length.
"""

from __future__ import annotations

import uuid
from typing import Any

import datasets
import numpy as np

from childtuning_trainer.tasks.base import Examples

FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(
    examples: Examples, tokenizer: Any, max_seq_length: int, *, num_proc: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenises ``examples`` with ``datasets.map``.

    Args:
      examples: the split to encode.
      tokenizer: a ``transformers`` (fast) tokenizer.
      max_seq_length: the length every sequence is padded or truncated to.
      num_proc: worker processes for ``datasets.map`` (``None``: this process).

    Returns:
      ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32, shape ``(n, max_seq_length)``)
      and ``labels`` (int32 ids or float32 targets, shape ``(n,)``).
    """
    columns: dict[str, Any] = {"text_a": examples.text_a}
    if examples.text_b is not None:
        columns["text_b"] = examples.text_b

    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        return tokenizer(
            batch["text_a"],
            batch.get("text_b"),
            padding="max_length",
            truncation=True,
            max_length=max_seq_length,
            return_token_type_ids=True,
        )

    ds = datasets.Dataset.from_dict(columns).map(
        encode,
        batched=True,
        remove_columns=list(columns),
        num_proc=num_proc,
        keep_in_memory=True,
        load_from_cache_file=False,
        # Nothing is cached, so no fingerprint is needed: a given one spares `datasets` from
        # pickling ``encode`` (the whole tokenizer) to hash it, on every call.
        new_fingerprint=uuid.uuid4().hex,
    )
    out = {k: np.asarray(ds[k], dtype=np.int32) for k in FEATURES}
    out["labels"] = np.asarray(examples.labels)
    return out
