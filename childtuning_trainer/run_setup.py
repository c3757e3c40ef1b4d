"""A run's inputs, ready to train: its settings, devices, data, model and step counts.

:func:`prepare` checks what the settings alone cannot (the devices, the data files, the model),
then tokenises the data and loads the model into a :class:`Run`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import transformers
from flax import nnx

from childtuning_jax import FlatLayout
from childtuning_jax.models import from_pretrained
from childtuning_trainer import (
    checkpoints,
    distributed,
    extra_eval,
    held_flat,
    input_pipeline,
    model_check,
    optimizer_chain,
    parallel,
    regularization,
    run_folder,
    steps,
)
from childtuning_trainer.objective import Model, make_objective
from childtuning_trainer.progress import Progress
from childtuning_trainer.settings import ModelSettings, Settings
from childtuning_trainer.tasks import Task


def load_model(model: ModelSettings, task: Task, seed: int) -> tuple[Model, Any]:
    """Loads the checkpoint with a fresh head for ``task``; returns the split model and params.

    ``model.dropout`` (unless ``None``) sets every dropout rate of the architecture, head
    included (``childtuning_jax.models.dropout_overrides``).
    """
    module = from_pretrained(
        model.name,
        num_labels=task.num_labels,
        seed=seed,
        dropout=model.dropout,
        dtype=model.compute_dtype,
    )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest, task.num_labels, module.config.to_json_string()), params


@dataclasses.dataclass
class Run:
    """The run's settings with its data, model, devices and step counts."""

    settings: Settings
    devices: list[jax.Device]
    data: input_pipeline.TaskData
    model: Model
    params: Any  # the initial parameters, on the host (dropped once on the devices)
    manager: ocp.CheckpointManager
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    extra_sets: list[extra_eval.ExtraSet] = dataclasses.field(default_factory=list)
    held: FlatLayout | None = None  # the layout the train state holds the params in (held_flat)

    @property
    def task(self) -> Task:
        return self.settings.task

    @property
    def reserve_p(self) -> float | None:
        return self.settings.child_tuning.reserve_p

    @property
    def global_batch(self) -> int:
        return self.settings.data.per_device_batch_size * len(self.devices)

    @property
    def objective(self):
        """The plain task loss (ChildTuning-D's Fisher pass uses it, whatever the regulariser)."""
        return make_objective(self.model, self.task.is_regression)

    @property
    def train_objective(self):
        """The train step's loss: the task loss, or the regulariser's wrapper of it."""
        return regularization.train_objective(
            self.settings.regularizer,
            self.model,
            self.task.is_regression,
            self.settings.model.has_dropout,
        )

    def train_step(self, tx: optax.GradientTransformation) -> Callable:
        """The train step mapped over the devices: ``(state, batch, rng) -> (state, metrics)``,
        on params held flat with :attr:`held` (set with the optimizer, ``loop.initial_state``)."""
        step = regularization.make_train_step(
            self.settings.regularizer,
            held_flat.objective(self.held, self.train_objective),
            tx,
            self.settings.model.has_dropout,
        )
        return parallel.map_train_step(step, self.devices)

    def eval_step(self) -> Callable:
        return parallel.map_eval_step(steps.make_eval_step(self.model), self.devices)

    def record_shape(self, progress: Progress) -> None:
        """Writes the run's config and shape into ``progress`` (a resume checks them)."""
        progress.config = self.settings.config
        progress.global_batch_size = self.global_batch
        progress.num_devices = len(self.devices)
        progress.num_train_examples = self.data.num_train_examples

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Epoch ``epoch``'s (0-based) training batches, from batch ``start_batch`` on."""
        data = self.data
        order = input_pipeline.epoch_order(self.settings.seed, epoch, data.num_train_examples)
        return input_pipeline.train_batches(
            data.train, order, self.global_batch, start_batch, data.padding
        )

    @functools.cached_property
    def _train_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.settings.seed), 3)

    def step_rng(self, step: int) -> jax.Array:
        """The key of step ``step`` (0-based; dropout, mixout, R3F noise)."""
        return jax.random.fold_in(self._train_key, step)


def prepare(run_settings: Settings) -> Run:
    """Checks what the settings alone cannot (devices, data, model), then tokenises and loads the
    model."""
    distributed.initialize(run_settings.parallelism)  # joins the other processes, before JAX work
    task, data_settings, outs = run_settings.task, run_settings.data, run_settings.outputs
    parallelism, model_settings = run_settings.parallelism, run_settings.model
    devices = parallel.select_devices(parallelism.num_devices, parallelism.kind)
    train_examples, dev_examples = input_pipeline.load_examples(
        data_settings, run_settings.seed, task
    )
    extra_sets = extra_eval.load_sets(data_settings.extra_eval, task)
    model_check.check_model(model_settings.name, task, data_settings.max_seq_length)
    run_folder.claim(outs)  # refuses another run's folder unless resume or overwrite
    manager = checkpoints.checkpoint_manager(outs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_settings.name)
    max_length = data_settings.max_seq_length
    data = input_pipeline.tokenize_all(train_examples, dev_examples, task, tokenizer, max_length)
    extra_sets = extra_eval.tokenize_sets(extra_sets, tokenizer, max_length)
    global_batch = data_settings.per_device_batch_size * len(devices)
    padding = input_pipeline.make_padding(
        data_settings,
        tokenizer,
        data,
        global_batch,
        seed=run_settings.seed,
        epochs=run_settings.num_train_epochs,
    )
    data = data._replace(padding=padding)
    steps_per_epoch = input_pipeline.num_batches(data.num_train_examples, global_batch)
    total_steps = steps_per_epoch * run_settings.num_train_epochs
    model, params = load_model(model_settings, task, run_settings.seed)
    optimizer = run_settings.optimizer
    schedule = optimizer_chain.learning_rate_schedule(
        optimizer.learning_rate, optimizer.warmup_ratio, total_steps
    )
    return Run(
        run_settings,
        devices,
        data,
        model,
        params,
        manager,
        steps_per_epoch,
        total_steps,
        schedule,
        extra_sets,
    )
