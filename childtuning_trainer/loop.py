"""The run: check the input, load data and model, (Fisher pass,) train, evaluate, checkpoint.

``train_and_evaluate(config)`` is what ``train.py`` calls; it reads the config once, into
:class:`~childtuning_trainer.settings.Settings`. Every other module supplies one piece:
``tasks`` and ``input_pipeline`` (the data), ``objective`` (the loss), ``optimizer_chain`` and
``mask_rules`` (D's child network), ``steps`` and ``parallel`` (the mapped steps),
``checkpoints`` and ``outputs`` (what is saved).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import transformers
from flax import nnx
from tqdm.auto import tqdm

from childtuning_jax import template_child_mask, uniform_leaf_names
from childtuning_jax.models import from_pretrained
from childtuning_trainer import (
    checkpoints,
    distributed,
    extra_eval,
    input_pipeline,
    mask_rules,
    optimizer_chain,
    outputs,
    parallel,
    regularization,
    saved_model,
    settings,
    steps,
)
from childtuning_trainer.objective import Model, make_objective
from childtuning_trainer.settings import ModelSettings, Settings
from childtuning_trainer.steps import TrainState
from childtuning_trainer.tasks import Task
from childtuning_trainer.tasks import metrics as task_metrics


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


def best_epoch(history: list[dict], task: Task) -> dict:
    """The epoch with the highest first metric of the task (the earliest among ties)."""
    key = task.metrics[0]
    return max(history, key=lambda h: (h["eval"][key], -h["epoch"]))


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
        """The train step mapped over the devices: ``(state, batch, rng) -> (state, metrics)``."""
        step = regularization.make_train_step(
            self.settings.regularizer,
            self.train_objective,
            tx,
            self.settings.model.has_dropout,
        )
        return parallel.map_train_step(step, self.devices)

    def eval_step(self) -> Callable:
        return parallel.map_eval_step(steps.make_eval_step(self.model), self.devices)

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
    settings.check_model(model_settings.name, task, data_settings.max_seq_length)
    os.makedirs(outs.output_dir, exist_ok=True)
    manager = checkpoints.checkpoint_manager(outs)
    if manager.latest_step() is not None and not outs.resume:
        raise ValueError(
            f"{outs.output_dir!r} already holds checkpoints; set --config.resume=true to "
            "continue that run, or choose another output_dir."
        )
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


def initial_state(run: Run) -> tuple[TrainState, optax.GradientTransformation, dict]:
    """The state to start from (on the host), the optimizer, and the run's bookkeeping.

    With ``resume`` and a checkpoint: the checkpoint's state (ChildTuning-D's mask included) and
    bookkeeping. Otherwise step 0, after the mask rule (the Fisher pass) for ChildTuning-D.
    """
    run_settings, params = run.settings, run.params
    output_dir = run_settings.outputs.output_dir
    saved_meta = checkpoints.restore_meta(run.manager) if run_settings.outputs.resume else None
    if saved_meta is not None:
        uniform = saved_meta.get("d_mask_uniform_leaves", [])
        template_mask = template_child_mask(params, uniform)
        tx = optimizer_chain.run_optimizer(run_settings, params, run.schedule, mask=template_mask)
        template = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        restored = checkpoints.restore_checkpoint(run.manager, template)
        if restored is not None:
            state, meta = restored
            checkpoints.check_resumable(run_settings, meta, run.global_batch)
            print(f"Resuming from step {meta['step']} in {output_dir}")
            return state, tx, meta
    meta = {"step": 0, "history": [], "fisher_time_s": None, "train_time_s": 0.0}
    meta["eval_time_s"] = 0.0
    mask = None
    if run_settings.child_tuning.mode == "D":
        start = time.perf_counter()
        mask, meta["fisher_source"] = mask_rules.child_mask(
            run_settings,
            run.objective,
            params,
            run.data,
            run.devices,
            architecture=run.model.architecture,
        )
        meta["fisher_time_s"] = time.perf_counter() - start
        meta["d_mask_uniform_leaves"] = uniform_leaf_names(mask)
        summary = mask_rules.mask_summary(mask, run.reserve_p)
        meta["kept_fraction"] = summary["kept_fraction_encoder_layers"]
        summary["fisher_time_s"] = meta["fisher_time_s"]
        summary["fisher_source"] = meta["fisher_source"]
        outputs.write_json(os.path.join(output_dir, "mask_summary.json"), summary)
        print(
            f"Fisher information: {meta['fisher_time_s']:.1f}s; child network keeps "
            f"{summary['kept_fraction_encoder_layers']:.3f} of encoder-layer weights"
        )
        if (
            run_settings.child_tuning.prune
        ):  # the pruning ablation: the model is the child network alone
            params = mask_rules.prune(params, mask)
    tx = optimizer_chain.run_optimizer(run_settings, params, run.schedule, mask=mask)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), tx, meta


def train_loop(
    run: Run, state: TrainState, tx: optax.GradientTransformation, meta: dict
) -> TrainState | None:
    """Trains from ``meta['step']`` to the end, evaluating and checkpointing on the way.

    ``state`` is replicated over the devices; ``meta`` is updated in place. Returns the final
    state, or ``None`` if ``config.stop_after_steps`` stopped the run.
    """
    outs, mode = run.settings.outputs, run.settings.child_tuning.mode
    data, devices = run.data, run.devices
    p_train_step, p_eval_step = run.train_step(tx), run.eval_step()
    log = outputs.MetricsLog(os.path.join(outs.output_dir, "metrics.jsonl"), meta["step"])
    board = outputs.TensorBoard(
        os.path.join(outs.output_dir, "tensorboard"), outs.tensorboard, meta["step"]
    )
    kept_fraction = {"vanilla": 1.0, "F": run.reserve_p}.get(mode, meta.get("kept_fraction"))
    last_log = (meta["step"], time.perf_counter())
    step = meta["step"]
    interval_losses: list[float] = meta.pop("interval_losses", [])  # since the last log line
    desc = f"{run.task.name} {mode}"
    bar = tqdm(total=run.total_steps, initial=step, desc=desc, unit="step")

    def checkpoint(step: int) -> None:
        """Saves the state with where the data stream stands (epoch e's order is
        ``epoch_order(seed, e)``) and the losses since the last log line."""
        epoch, batch = divmod(step, run.steps_per_epoch)
        order = {"seed": run.settings.seed, "epoch": epoch, "batch": batch}
        extra = {"step": step, "data_order": order, "interval_losses": interval_losses}
        checkpoints.save_checkpoint(run.manager, state, {**meta, **extra})

    while step < run.total_steps:
        epoch, start_batch = divmod(step, run.steps_per_epoch)
        start = time.perf_counter()
        epoch_time = 0.0  # this epoch's training time in this process (compiles included)
        for batch in run.epoch_batches(epoch, start_batch):
            batch = parallel.shard_batch(batch, devices)
            state, metrics = p_train_step(state, batch, run.step_rng(step))
            step += 1
            loss, lr = float(metrics["loss"][0]), float(run.schedule(step - 1))
            interval_losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % outs.log_every_steps == 0 or step % run.steps_per_epoch == 0:
                record = {"step": step, "epoch": epoch + 1, "loss": float(np.mean(interval_losses))}
                record.update(learning_rate=lr, grad_norm=float(metrics["grad_norm"][0]))
                log.write(record)
                now = time.perf_counter()
                scalars = {f"train/{k}": record[k] for k in ("loss", "learning_rate", "grad_norm")}
                scalars["train/step_time_s"] = (now - last_log[1]) / (step - last_log[0])
                if kept_fraction is not None:
                    scalars["train/kept_fraction"] = kept_fraction
                board.write(step, scalars)
                last_log = (step, now)
                interval_losses = []
            if step == outs.stop_after_steps:
                bar.close()
                board.close()
                return None
            if step % outs.checkpoint_every_steps == 0 and step % run.steps_per_epoch:
                elapsed = time.perf_counter() - start
                meta["train_time_s"] += elapsed
                epoch_time += elapsed
                start = time.perf_counter()
                checkpoint(step)
        elapsed = time.perf_counter() - start
        meta["train_time_s"] += elapsed
        meta.setdefault("epoch_train_time_s", []).append(epoch_time + elapsed)
        if outs.eval_every_epoch or step == run.total_steps:
            start = time.perf_counter()
            metrics = steps.evaluate(p_eval_step, state.params, data, devices, run.global_batch)
            meta["eval_time_s"] += time.perf_counter() - start
            meta["history"].append({"epoch": epoch + 1, "step": step, "eval": metrics})
            log.write({"step": step, "epoch": epoch + 1, "eval": metrics})
            board.write(step, {f"eval/{name}": value for name, value in metrics.items()})
            bar.write(f"epoch {epoch + 1}: {json.dumps(metrics)}")
        meta["step"] = step
        checkpoint(step)
        last_log = (step, time.perf_counter())  # the next interval does not count evaluation
    bar.close()
    board.close()
    return state


def results_of(run: Run, meta: dict) -> dict:
    """The run's ``results.json``."""
    run_settings, task, history = run.settings, run.task, meta["history"]
    config = run_settings.config
    best = best_epoch(history, task)
    dev_sizes = zip(task.dev_sets, run.data.dev, strict=True)
    predictor, baseline = task_metrics.trivial_baseline(
        task, run.data.train["labels"], run.data.dev[0]["labels"]
    )
    return {
        "task": task.name,
        "mode": run_settings.child_tuning.mode,
        "reserve_p": run.reserve_p,
        "regularizer": run_settings.regularizer.settings(),
        "seed": run_settings.seed,
        "model": run_settings.model.name,
        "num_train_examples": run.data.num_train_examples,
        "num_dev_examples": {d.name: len(f["labels"]) for d, f in dev_sizes},
        "steps": run.total_steps,
        "epochs": run_settings.num_train_epochs,
        "global_batch_size": run.global_batch,
        "num_devices": len(run.devices),
        "max_seq_length": run_settings.data.max_seq_length,
        "learning_rate": run_settings.optimizer.learning_rate,
        "eval": history[-1]["eval"],
        "best": {"epoch": best["epoch"], "metric": task.metrics[0], "eval": best["eval"]},
        "history": history,
        "baseline": {"predictor": predictor, "eval": baseline},
        "extra_eval": meta.get("extra_eval", {}),
        "fisher_time_s": meta["fisher_time_s"],
        "fisher_source": meta.get("fisher_source"),
        "train_time_s": meta["train_time_s"],
        "epoch_train_time_s": meta.get("epoch_train_time_s", []),
        "eval_time_s": meta["eval_time_s"],
        "config": config,
    }


def train_and_evaluate(config: ml_collections.ConfigDict) -> tuple[dict, Any] | None:
    """Fine-tunes ``config.model`` on ``config.task``.

    Bad input is reported before any model weight is loaded. Writes checkpoints, ``metrics.jsonl``,
    ``results.json`` (and ``mask_summary.json`` for ChildTuning-D) to ``config.output_dir``.

    Returns:
      ``(results, params)``: the results also written to ``output_dir/results.json``, and the final
      parameters on the host. ``None`` when ``config.stop_after_steps`` ended the run early.
    """
    run = prepare(Settings.from_config(config))
    host_state, tx, meta = initial_state(run)
    meta.update(
        config=run.settings.config,
        global_batch_size=run.global_batch,
        num_devices=len(run.devices),
        num_train_examples=run.data.num_train_examples,
    )
    state = parallel.replicate(host_state, run.devices)
    del host_state
    run.params = None  # the devices hold the parameters now
    state = train_loop(run, state, tx, meta)
    run.manager.wait_until_finished()
    run.manager.close()
    if state is None:
        return None
    meta["extra_eval"] = extra_eval.evaluate(
        run.extra_sets,
        run.model,
        state.params,
        run.task.labels,
        run.devices,
        run.global_batch,
        run.data.padding,
    )
    results = results_of(run, meta)
    host_params = parallel.to_host(state.params)
    output_dir = run.settings.outputs.output_dir
    if run.settings.outputs.save_model and distributed.is_writer():
        saved_model.save_params(output_dir, host_params)
    outputs.write_json(os.path.join(output_dir, "results.json"), results)
    return results, host_params
