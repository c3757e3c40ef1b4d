"""A run group's training: one vmapped train step for every run, checkpointed and resumed as one.

:func:`train_group` is the group's ``train_and_evaluate``: the runs' states are stacked
(:mod:`childtuning_trainer.group_setup`), each step trains every run on its own batch (the same
batch, key and learning rate it has alone), evaluation scores every run in one program, and each
run writes its own ``metrics.jsonl``, ``results.json`` (the loop's ``results_of``: the fields and
``config`` of the run alone), ``model/`` and the predictions. The group's checkpoints (in the group
folder) hold the stacked state and every run's :class:`~childtuning_trainer.progress.Progress`,
so a killed group resumes every run where it stood. SIGINT and SIGTERM stop the group as they stop
a run alone (:mod:`childtuning_trainer.interruption`): the step finishes, the group checkpoints,
and :class:`~childtuning_trainer.interruption.Interrupted` says how to resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_trainer import (
    checkpoints,
    compilation,
    extra_eval,
    final_outputs,
    input_pipeline,
    outputs,
    parallel,
    regularization,
    run_groups,
)
from childtuning_trainer.group_setup import (
    Group,
    group_optimizer,
    initial_group_state,
    prepare_group,
    template_state,
)
from childtuning_trainer.interruption import StopRequest
from childtuning_trainer.progress import EpochClock, Progress
from childtuning_trainer.steps import TrainState
from childtuning_trainer.tasks import metrics as task_metrics

# The group checkpoint's meta: {"step", "uniform", "flat_update", "runs": [Progress JSON]}.
META_KEY = "runs"


def group_train_step(group: Group, params: Any) -> Callable:
    """``(stacked state, group batch, stacked keys) -> (state, metrics per run)``: the lead run's
    train step vmapped over the runs, mapped over the devices."""
    lead = group.lead
    regularizer = lead.settings.regularizer
    step = regularization.make_train_step(
        regularizer,
        lead.train_objective,
        group_optimizer(group, params),
        lead.settings.model.has_dropout,
    )
    return parallel.map_train_step(jax.vmap(step, in_axes=(0, 1, 0)), group.devices)


def group_eval_step(group: Group) -> Callable:
    """``(stacked params, batch) -> logits (devices, runs, rows, labels)`` on the host."""
    model = group.lead.model
    step = lambda params, batch: jax.vmap(lambda p: model.apply(p, batch, dropout_rng=None))(params)
    return parallel.map_eval_step(step, group.devices)


def evaluate(group: Group, eval_step: Callable, params: Any) -> list[dict[str, float]]:
    """Every run's dev metrics (``steps.evaluate`` per run), each batch cut to the longest of the
    runs' own lengths."""
    lead, batch_size = group.lead, group.lead.global_batch
    metrics: list[dict[str, float]] = [{} for _ in group.runs]
    for dev_set, features in zip(lead.task.dev_sets, lead.data.dev, strict=True):
        logits: list[list[np.ndarray]] = [[] for _ in group.runs]
        for full in input_pipeline.eval_batches(features, batch_size):
            length = run_groups.common_length([full] * len(group.runs), group.paddings)
            batch = run_groups.cut(full, length, group.paddings[0].side)
            weights = batch.pop("weights")
            out = eval_step(params, parallel.shard_batch(batch, group.devices))
            for r in range(len(group.runs)):
                logits[r].append(out[:, r].reshape(batch_size, -1)[weights > 0])
        for r, run_logits in enumerate(logits):
            preds = task_metrics.predictions(lead.task, np.concatenate(run_logits))
            scores = task_metrics.compute_metrics(lead.task, preds, features["labels"])
            metrics[r].update({name + dev_set.suffix: v for name, v in scores.items()})
    return metrics


def save(group: Group, state: TrainState, progresses: Sequence[Progress], logs: Sequence) -> None:
    """One checkpoint of the stacked state with every run's bookkeeping (``loop.save_checkpoint``
    for each run)."""
    metas = []
    for run, progress, log in zip(group.runs, progresses, logs, strict=True):
        epoch, batch = divmod(progress.step, run.steps_per_epoch)
        progress.data_order = {"seed": run.settings.seed, "epoch": epoch, "batch": batch}
        progress.interval_losses = log.interval_losses
        metas.append(progress.to_json())
    meta = {"step": progresses[0].step, "uniform": group.uniform, "flat_update": group.flat}
    checkpoints.save_checkpoint(group.manager, state, {**meta, META_KEY: metas})


def restore(group: Group) -> tuple[TrainState, list[Progress]] | None:
    """The group's newest readable checkpoint, in the mask layout and chain (flat or per leaf)
    it was written with (every run checked as ``loop.restore`` checks it)."""

    def template(meta: dict) -> TrainState:
        group.uniform = meta["uniform"]
        group.flat = bool(meta.get("flat_update", group.flat))
        return template_state(group)

    restored = checkpoints.restore_newest_readable(group.manager, template)
    if restored is None:
        return None
    state, meta = restored
    template(meta)  # the layout of the checkpoint read
    progresses = []
    for run, run_meta in zip(group.runs, meta[META_KEY], strict=True):
        checkpoints.check_resumable(run.settings, run_meta, run.global_batch)
        progresses.append(Progress.from_json(run_meta))
    print(f"Resuming the group from step {meta['step']}")
    return state, progresses


def epoch_batches(group: Group, epoch: int, start: int):
    """Step by step, every run's batch (its own order, full length), as one group batch."""
    streams = []
    for run in group.runs:
        order = input_pipeline.epoch_order(run.settings.seed, epoch, run.data.num_train_examples)
        streams.append(input_pipeline.train_batches(run.data.train, order, run.global_batch, start))
    for batches in zip(*streams, strict=True):
        yield run_groups.group_batch(batches, group.paddings)


def training_logs(group: Group, progresses: Sequence[Progress]) -> list[outputs.TrainingLog]:
    """Each run's ``metrics.jsonl``, TensorBoard and progress bar, from where it stands."""
    return [
        outputs.TrainingLog(
            r.settings.outputs.output_dir,
            r.settings.outputs.tensorboard,
            step=p.step,
            total_steps=r.total_steps,
            desc=f"{r.task.name} {r.settings.child_tuning.mode} s{r.settings.seed}",
            interval_losses=p.interval_losses,
            kept_fraction={"vanilla": 1.0, "F": r.reserve_p}.get(
                r.settings.child_tuning.mode, p.kept_fraction
            ),
        )
        for r, p in zip(group.runs, progresses, strict=True)
    ]


def train(
    group: Group, state: TrainState, progresses: list[Progress], stop: StopRequest
) -> TrainState | None:
    """``loop.train_loop`` for the group: every run's log, evaluation and checkpoint at the
    steps they come alone. Returns ``None`` when ``stop_after_steps`` or a signal (``stop``,
    after a checkpoint) stopped the group."""
    lead, runs = group.lead, group.runs
    outs = lead.settings.outputs
    train_step = group_train_step(group, lead.params)
    eval_step = group_eval_step(group)
    logs = training_logs(group, progresses)

    def close() -> None:
        for log in logs:
            log.close()

    # Run.step_rng per run: fold_in(fold_in(key(seed), 3), step).
    base_keys = jnp.stack([jax.random.fold_in(jax.random.key(r.settings.seed), 3) for r in runs])
    step_keys = jax.jit(jax.vmap(jax.random.fold_in, (0, None)))
    step = progresses[0].step
    while step < lead.total_steps:
        epoch, start = divmod(step, lead.steps_per_epoch)
        clocks = [EpochClock(p) for p in progresses]
        for batch in epoch_batches(group, epoch, start):
            batch = parallel.shard_batch(batch, group.devices)
            state, metrics = train_step(state, batch, step_keys(base_keys, step))
            step += 1
            losses, norms = np.asarray(metrics["loss"][0]), np.asarray(metrics["grad_norm"][0])
            for r, (run, progress, log) in enumerate(zip(runs, progresses, logs, strict=True)):
                progress.step = step
                learning_rate = float(run.schedule(step - 1))
                log.steps([float(losses[r])], learning_rate)
                if step % outs.log_every_steps == 0 or step % lead.steps_per_epoch == 0:
                    log.interval(step, epoch + 1, learning_rate, float(norms[r]))
            if step == outs.stop_after_steps:
                close()
                return None
            mid_epoch = bool(step % lead.steps_per_epoch)
            stopping = mid_epoch and stop.requested(step)  # a signal
            if mid_epoch and (stopping or step % outs.checkpoint_every_steps == 0):
                for clock in clocks:
                    clock.lap()
                save(group, state, progresses, logs)
            if stopping:  # a signal: stop after this step's checkpoint
                close()
                return None
        for clock, progress in zip(clocks, progresses, strict=True):
            progress.epoch_train_time_s.append(clock.lap())
        if outs.eval_every_epoch or step == lead.total_steps:
            clock = EpochClock(Progress())
            scores = evaluate(group, eval_step, state.params)
            spent = clock.lap()
            for progress, log, metrics in zip(progresses, logs, scores, strict=True):
                progress.eval_time_s += spent
                progress.history.append({"epoch": epoch + 1, "step": step, "eval": metrics})
                log.evaluation(step, epoch + 1, metrics)
        save(group, state, progresses, logs)
        if step < lead.total_steps and stop.requested(step, agree=True):
            close()
            return None
        for log in logs:
            log.restart(step)
    close()
    return state


def finish(
    group: Group,
    state: TrainState,
    progresses: Sequence[Progress],
    results_of: Callable,
    report: dict[str, Any],
) -> list[tuple]:
    """Each run's extra evaluation, ``results.json`` (``results_of``) and parameters, as a run
    alone writes them; ``report``: the group's compiled programs and peak memory, with its size,
    in every run's."""
    host = parallel.to_host(state.params)
    finished = []
    for r, (run, progress) in enumerate(zip(group.runs, progresses, strict=True)):
        params = run_groups.unstack(host, r)
        extra, placed = {}, parallel.replicate(params, run.devices)
        if run.extra_sets:
            extra = extra_eval.evaluate(
                run.extra_sets,
                run.model,
                placed,
                run.task.labels,
                run.devices,
                run.global_batch,
                run.data.padding,
            )
        results = results_of(run, progress, extra)
        results.update(report, group_size=len(group.runs))
        output_dir = run.settings.outputs.output_dir
        results.update(final_outputs.finish(run, placed, params, progress, best=None))
        outputs.write_json(os.path.join(output_dir, "results.json"), results)
        finished.append((results, params))
    return finished


def train_group(
    configs: Sequence[Any], group_dir: str, results_of: Callable
) -> list[tuple[dict, Any]] | None:
    """Trains the runs of ``configs`` as one group (checkpoints in ``group_dir``); returns each
    run's ``(results, params)`` as ``train_and_evaluate`` does alone (``results_of``:
    ``loop.results_of``, passed in by the entry), or ``None`` when ``stop_after_steps`` stopped
    the group.

    Raises:
      interruption.Interrupted: SIGINT or SIGTERM stopped the group (after a checkpoint).
    """
    compiled_before = compilation.programs()
    with StopRequest() as stop:
        group = prepare_group(configs, group_dir)
        stop.every = group.lead.settings.outputs.log_every_steps
        stop.take_signals()  # back from jax.distributed's SIGTERM handler
        restored = restore(group) if group.lead.settings.outputs.resume else None
        host_state, progresses = restored or initial_group_state(group)
        for run, progress in zip(group.runs, progresses, strict=True):
            run.record_shape(progress)
            progress.flat_update = group.flat
        state = parallel.replicate(host_state, group.devices)
        del host_state
        state = train(group, state, progresses, stop)
        group.manager.wait_until_finished()
        group.manager.close()
        for run in group.runs:
            run.manager.close()
        if state is None:
            stop.raise_if_stopped(progresses[0].step)
            return None
        report = compilation.run_report(group.devices, compiled_before)
        return finish(group, state, progresses, results_of, report)
