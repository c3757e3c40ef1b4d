"""Configuration checks, all done before any data is tokenised or any weight is loaded."""

from __future__ import annotations

from typing import Any

import ml_collections
import transformers

from childtuning_trainer import (
    extra_eval,
    input_pipeline,
    mask_rules,
    optimizer_chain,
    regularization,
    tasks,
)


def check_config(config: ml_collections.ConfigDict) -> tasks.Task:
    """Validates the settings that need no files; returns the task."""
    task = tasks.get_task(config.task)
    optimizer_chain.check_mode(config.mode)
    if config.optimizer not in optimizer_chain.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; expected one of "
            f"{', '.join(optimizer_chain.OPTIMIZERS)}."
        )
    mask_rules.get_mask_rule(config.mask_rule)
    if config.prune and config.mode != "D":
        raise ValueError(f"config.prune needs mode D (the child network), not {config.mode!r}.")
    positive = ("learning_rate", "num_train_epochs", "per_device_batch_size", "max_seq_length")
    for key in positive:
        if not config[key] > 0:
            raise ValueError(f"config.{key}={config[key]} must be positive.")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"Unknown dtype {config.dtype!r}; expected float32 or bfloat16.")
    if config.padding not in input_pipeline.PADDINGS:
        raise ValueError(
            f"Unknown padding {config.padding!r}; expected one of "
            f"{', '.join(input_pipeline.PADDINGS)}."
        )
    if not (isinstance(config.bucket_multiple, int) and config.bucket_multiple > 0):
        raise ValueError(f"config.bucket_multiple={config.bucket_multiple} must be a positive int.")
    if not (isinstance(config.max_buckets, int) and config.max_buckets >= 0):
        raise ValueError(f"config.max_buckets={config.max_buckets} must be an int >= 0.")
    if not 0.0 <= config.bucket_min_share < 1.0:
        raise ValueError(f"config.bucket_min_share={config.bucket_min_share} must be in [0, 1).")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"config.warmup_ratio={config.warmup_ratio} must be in [0, 1].")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout} must be in [0, 1).")
    if not config.output_dir:
        raise ValueError("config.output_dir is empty; name a folder for checkpoints and results.")
    optimizer_chain.resolve_reserve_p(config.mode, task.name, config.reserve_p)
    regularization.check_config(config)  # (mixout: an unset dropout becomes 0)
    extra_eval.check_config(config.get("extra_eval", ""), task)
    return task


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
