"""Whether a model can be fine-tuned on a task, from its ``transformers`` config alone."""

from __future__ import annotations

from typing import Any

import transformers

from childtuning_trainer import tasks


def check_model(name_or_path: str, task: tasks.Task, max_seq_length: int) -> Any:
    """Loads the model's ``transformers`` config; checks that it can be fine-tuned on ``task``.

    Any architecture of ``childtuning_jax.models`` (BERT, RoBERTa, ELECTRA, XLNet), with or
    without a sequence-classification head.
    """
    from childtuning_jax.models import ARCHITECTURES

    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot load model {name_or_path!r}: {e}") from None
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Model {name_or_path!r} has model_type {model_type!r}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    architectures = hf_config.architectures or []
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if has_head and hf_config.num_labels != task.num_labels:
        raise ValueError(
            f"Model {name_or_path!r} has a classification head with {hf_config.num_labels} "
            f"output(s), but task {task.name!r} needs {task.num_labels}."
        )
    problem = getattr(hf_config, "problem_type", None)
    if has_head and problem and (problem == "regression") != task.is_regression:
        raise ValueError(
            f"Model {name_or_path!r} has a {problem} head; task {task.name!r} is "
            f"{'a regression' if task.is_regression else 'a classification'} task."
        )
    # XLNet's relative positions have no limit (its config answers -1).
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and 0 < limit < max_seq_length:
        raise ValueError(
            f"config.max_seq_length={max_seq_length} exceeds the model's "
            f"max_position_embeddings={limit}."
        )
    return hf_config
