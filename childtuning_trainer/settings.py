"""A run's settings: the command line's config, checked once and read into frozen dataclasses.

``Settings.from_config(config)`` is the one place that reads an ``ml_collections`` config
(``configs/glue.py`` lists every key): each bad value is one ``ValueError`` naming the key, raised
before any data is tokenised or any weight is loaded. The trainer's modules then take the group
they need: the task, :class:`ModelSettings`, :class:`DataSettings`, the optimizer's
:class:`~childtuning_trainer.optimizer_chain.OptimizerSettings`, :class:`ChildTuningSettings`, the
:class:`~childtuning_trainer.regularization.Regularizer`, :class:`ParallelismSettings` and
:class:`OutputSettings`. ``Settings.config`` keeps the raw dict, as ``results.json`` and the
checkpoints record it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

from childtuning_trainer import (
    data_location,
    extra_eval,
    input_pipeline,
    mask_rules,
    optimizer_chain,
    regularization,
    tasks,
)
from childtuning_trainer.optimizer_chain import OptimizerSettings
from childtuning_trainer.regularization import Regularizer
from childtuning_trainer.tasks import own_data

# config.dtype -> the models' compute dtype (parameters, optimizer state, Fisher and masks stay
# float32 whatever it is).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ADDRESS = re.compile(r"^\S+:\d+$")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The checkpoint (folder or hub name), its compute dtype, and dropout (``None``: the
    checkpoint's own rates)."""

    name: str
    dtype: str = "float32"
    dropout: float | None = None

    @property
    def has_dropout(self) -> bool:
        """False when ``dropout`` switches dropout off (then no dropout key is drawn)."""
        return self.dropout is None or self.dropout > 0

    @property
    def compute_dtype(self) -> Any:
        return COMPUTE_DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the data is, how much of it, and how it is batched and padded."""

    data_dir: str
    max_seq_length: int
    per_device_batch_size: int
    padding: str
    bucket_multiple: int
    max_buckets: int
    bucket_min_share: float
    max_train_samples: int
    max_eval_samples: int
    extra_eval: str


@dataclasses.dataclass(frozen=True)
class ChildTuningSettings:
    """The mode, its resolved ``reserve_p`` (``None`` for vanilla), and D's mask rule and pass."""

    mode: str
    reserve_p: float | None
    mask_rule: str
    fisher_max_train_samples: int
    fisher_cache_dir: str
    prune: bool


@dataclasses.dataclass(frozen=True)
class ParallelismSettings:
    """How steps are mapped (``kind``), over how many local devices (0: all), and the
    multi-process keys (all set, or none)."""

    kind: str
    num_devices: int
    coordinator_address: str
    num_processes: int | None
    process_id: int | None

    @property
    def explicit(self) -> bool:
        """Whether the run names its processes (``coordinator_address`` and the other two)."""
        return bool(self.coordinator_address)


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """What a run writes, where, and how often; ``stop_after_steps`` stops it as if killed."""

    output_dir: str
    resume: bool
    overwrite: bool
    eval_every_epoch: bool
    log_every_steps: int
    tensorboard: bool
    checkpoint_every_steps: int
    keep_checkpoints: int
    save_model: bool
    stop_after_steps: int
    save_best: bool = False  # model/ holds the best epoch's weights (final_outputs)
    do_train: bool = True  # False: evaluate and predict with config.model (evaluation)
    write_predictions: bool = True  # output_dir/predictions/ (predictions)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run is, checked: see the module docstring."""

    task: tasks.Task
    seed: int
    model: ModelSettings
    data: DataSettings
    optimizer: OptimizerSettings
    num_train_epochs: int
    child_tuning: ChildTuningSettings
    regularizer: Regularizer
    parallelism: ParallelismSettings
    outputs: OutputSettings
    config: dict[str, Any]  # the config as given (mixout's dropout set), for the records

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
        """Checks every setting that needs no data file; raises ``ValueError`` naming the first
        bad key. Mixout replaces dropout: an unset ``dropout`` becomes 0 (see
        :func:`childtuning_trainer.regularization.mixout_dropout`)."""
        parallelism = parallelism_settings(config)
        task = task_of(config)
        child_tuning = child_tuning_settings(config, task)
        optimizer = optimizer_settings(config)
        for key in POSITIVE_KEYS:
            if not config[key] > 0:
                raise ValueError(f"config.{key}={config[key]} must be positive.")
        model = model_settings(config)
        data = data_settings(config)
        outputs = output_settings(config)
        regularizer = regularization.from_config(config)
        model = dataclasses.replace(
            model, dropout=regularization.mixout_dropout(regularizer, model.dropout)
        )
        regularization.check_top_k_layers(regularizer, model.name)
        extra_eval.check_config(data.extra_eval, task)
        raw = config.to_dict()
        if "dropout" in raw:
            raw["dropout"] = model.dropout
        return cls(
            task=task,
            seed=config.seed,
            model=model,
            data=data,
            optimizer=optimizer,
            num_train_epochs=config.num_train_epochs,
            child_tuning=child_tuning,
            regularizer=regularizer,
            parallelism=parallelism,
            outputs=outputs,
            config=raw,
        )


def task_of(config: ml_collections.ConfigDict) -> tasks.Task:
    """The registered task ``config.task``, or ``csv`` / ``jsonl``: your own files, read now
    (:mod:`childtuning_trainer.tasks.own_data`)."""
    if config.task not in own_data.FORMATS:
        return tasks.get_task(config.task)
    files = own_data.FileSettings(
        config.task,
        train_file=config.train_file,
        validation_file=config.validation_file,
        test_file=config.test_file,
        text_columns=config.text_columns,
        label_column=config.label_column,
        label_type=config.label_type,
    )
    return own_data.load_task(files)


POSITIVE_KEYS = ("learning_rate", "num_train_epochs", "per_device_batch_size", "max_seq_length")


def child_tuning_settings(
    config: ml_collections.ConfigDict, task: tasks.Task
) -> ChildTuningSettings:
    """The Child-Tuning keys, checked; ``reserve_p`` resolved (the authors' value if unset)."""
    optimizer_chain.check_mode(config.mode)
    mask_rules.get_mask_rule(config.mask_rule)
    if config.prune and config.mode != "D":
        raise ValueError(f"config.prune needs mode D (the child network), not {config.mode!r}.")
    return ChildTuningSettings(
        mode=config.mode,
        reserve_p=optimizer_chain.resolve_reserve_p(config.mode, task.name, config.reserve_p),
        mask_rule=config.mask_rule,
        fisher_max_train_samples=config.fisher_max_train_samples,
        fisher_cache_dir=config.get("fisher_cache_dir", ""),
        prune=config.prune,
    )


def optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettings:
    """The optimizer keys, checked (the learning rate stays a number; the run makes the
    schedule)."""
    if config.optimizer not in optimizer_chain.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; expected one of "
            f"{', '.join(optimizer_chain.OPTIMIZERS)}."
        )
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"config.warmup_ratio={config.warmup_ratio} must be in [0, 1].")
    return OptimizerSettings(
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        warmup_ratio=config.warmup_ratio,
        flat_update=config.flat_update,
    )


def model_settings(config: ml_collections.ConfigDict) -> ModelSettings:
    """The model keys, checked (the regulariser may still change ``dropout``)."""
    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; expected float32 or bfloat16.")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout} must be in [0, 1).")
    return ModelSettings(config.model, config.dtype, config.dropout)


def data_settings(config: ml_collections.ConfigDict) -> DataSettings:
    """The data keys, checked."""
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
    return DataSettings(
        data_dir=data_location.task_data_dir(config.task, config.data_dir),
        max_seq_length=config.max_seq_length,
        per_device_batch_size=config.per_device_batch_size,
        padding=config.padding,
        bucket_multiple=config.bucket_multiple,
        max_buckets=config.max_buckets,
        bucket_min_share=config.bucket_min_share,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        extra_eval=config.get("extra_eval", ""),
    )


def parallelism_settings(config: ml_collections.ConfigDict) -> ParallelismSettings:
    """The parallelism keys; the three multi-process keys are checked (all set, or none)."""
    address = config.get("coordinator_address") or ""
    num_processes, process_id = config.get("num_processes"), config.get("process_id")
    given = [bool(address), num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "config.coordinator_address, config.num_processes and config.process_id go together: "
            f"got {address!r}, {num_processes!r}, {process_id!r} (set all three, or none)."
        )
    if any(given):
        if not _ADDRESS.match(address):
            raise ValueError(f"config.coordinator_address={address!r} must be host:port.")
        if not (isinstance(num_processes, int) and num_processes >= 1):
            raise ValueError(f"config.num_processes={num_processes!r} must be a positive int.")
        if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
            raise ValueError(
                f"config.process_id={process_id!r} must be in [0, {num_processes}) "
                f"(num_processes={num_processes})."
            )
    return ParallelismSettings(
        config.parallelism, config.num_devices, address, num_processes, process_id
    )


def output_settings(config: ml_collections.ConfigDict) -> OutputSettings:
    """The output keys (``output_dir`` must name a folder)."""
    if not config.output_dir:
        raise ValueError("config.output_dir is empty; name a folder for checkpoints and results.")
    if config.save_best and not config.save_model:
        raise ValueError("config.save_best=True needs config.save_model=True (it saves model/).")
    overwrite = config.get("overwrite", False)
    if config.resume and overwrite:
        raise ValueError("config.resume and config.overwrite exclude each other; set one.")
    return OutputSettings(
        output_dir=config.output_dir,
        resume=config.resume,
        overwrite=overwrite,
        eval_every_epoch=config.eval_every_epoch,
        log_every_steps=config.log_every_steps,
        tensorboard=config.tensorboard,
        checkpoint_every_steps=config.checkpoint_every_steps,
        keep_checkpoints=config.keep_checkpoints,
        save_model=config.save_model,
        stop_after_steps=config.stop_after_steps,
        save_best=config.save_best,
        do_train=config.do_train,
        write_predictions=config.write_predictions,
    )
