"""Configuration checks, all done before any data is tokenised or any weight is loaded."""

from __future__ import annotations

from typing import Any

import ml_collections
import transformers

from childtuning_trainer import recipe, tasks


def check_config(config: ml_collections.ConfigDict) -> tasks.Task:
    """Validates the settings that need no files; returns the task."""
    task = tasks.get_task(config.task)
    recipe.check_mode(config.mode)
    if config.optimizer not in recipe.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; expected one of "
            f"{', '.join(recipe.OPTIMIZERS)}."
        )
    recipe.get_mask_rule(config.mask_rule)
    positive = ("learning_rate", "num_train_epochs", "per_device_batch_size", "max_seq_length")
    for key in positive:
        if not config[key] > 0:
            raise ValueError(f"config.{key}={config[key]} must be positive.")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"config.warmup_ratio={config.warmup_ratio} must be in [0, 1].")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout} must be in [0, 1).")
    if not config.output_dir:
        raise ValueError("config.output_dir is empty; name a folder for checkpoints and results.")
    recipe.resolve_reserve_p(config.mode, task.name, config.reserve_p)
    return task


def check_model(name_or_path: str, task: tasks.Task, max_seq_length: int) -> Any:
    """Loads the model's ``transformers`` config; checks that it can be fine-tuned on ``task``."""
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot load model {name_or_path!r}: {e}") from None
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
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ValueError(
            f"config.max_seq_length={max_seq_length} exceeds the model's "
            f"max_position_embeddings={limit}."
        )
    return hf_config
