"""The run: check the input, load data and model, (Fisher pass,) train, evaluate, checkpoint.

``train_and_evaluate(config)`` is what ``train.py`` calls; it reads the config once, into
:class:`~childtuning_trainer.settings.Settings`. Every other module supplies one piece:
``run_setup`` (devices, data and model), ``tasks`` and ``input_pipeline`` (the data),
``objective`` (the loss), ``optimizer_chain`` and ``mask_rules`` (D's child network), ``steps``
and ``parallel`` (the mapped steps), ``progress``, ``checkpoints`` and ``outputs`` (what is
carried and saved).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from childtuning_jax import template_child_mask, uniform_leaf_names
from childtuning_trainer import (
    checkpoints,
    compilation,
    device_feed,
    evaluation,
    extra_eval,
    final_outputs,
    group_loop,
    held_flat,
    mask_rules,
    optimizer_chain,
    outputs,
    parallel,
    run_folder,
    run_groups,
    steps,
)
from childtuning_trainer.interruption import StopRequest
from childtuning_trainer.progress import EpochClock, Progress
from childtuning_trainer.run_setup import Run, prepare
from childtuning_trainer.settings import Settings
from childtuning_trainer.steps import TrainState
from childtuning_trainer.tasks import metrics as task_metrics


def initial_state(run: Run) -> tuple[TrainState, optax.GradientTransformation, Progress]:
    """The state to start from (on the host), the optimizer, and the run's bookkeeping.

    With ``resume`` and a checkpoint: the checkpoint's state (ChildTuning-D's mask included) and
    bookkeeping. Otherwise step 0, after the mask rule (the Fisher pass) for ChildTuning-D.
    """
    if run.settings.outputs.resume:
        restored = restore(run)
        if restored is not None:
            return restored
    progress, params, mask = Progress(), run.params, None
    if run.settings.child_tuning.mode == "D":
        mask = select_child_network(run, progress)
        if run.settings.child_tuning.prune:  # the pruning ablation: the child network alone
            params = mask_rules.prune(params, mask)
    progress.flat_update = optimizer_chain.uses_flat_update(run.settings.optimizer)
    tx, run.held = held_flat.run_optimizer(
        run.settings, params, run.schedule, mask=mask, flat=progress.flat_update
    )
    return held_flat.initial_state(run.held, params, tx), tx, progress


def restore(run: Run) -> tuple[TrainState, optax.GradientTransformation, Progress] | None:
    """The newest readable checkpoint's state, the optimizer, and its bookkeeping, if there is
    one (an unreadable newer one is set aside with a warning)."""
    params = run.params

    def optimizer(meta: dict, flat: bool) -> tuple[optax.GradientTransformation, Any]:
        mask = template_child_mask(params, meta.get("d_mask_uniform_leaves", []))
        return held_flat.run_optimizer(run.settings, params, run.schedule, mask=mask, flat=flat)

    def template(meta: dict) -> TrainState:
        # The chain (flat or per leaf) the checkpoint's optimizer state was written with; the
        # params as the tree, as checkpoints hold them.
        tx, layout = optimizer(meta, bool(meta.get("flat_update", False)))
        return held_flat.initial_state(layout, params, tx)._replace(params=params)

    restored = checkpoints.restore_newest_readable(run.manager, template)
    if restored is None:
        return None
    state, meta = restored
    tx, run.held = optimizer(meta, checkpoints.saved_flat_update(run.settings, meta))
    state = held_flat.hold(run.held, state)
    checkpoints.check_resumable(run.settings, meta, run.global_batch)
    progress = Progress.from_json(meta)
    print(f"Resuming from step {progress.step} in {run.settings.outputs.output_dir}")
    return state, tx, progress


def select_child_network(run: Run, progress: Progress) -> Any:
    """ChildTuning-D's mask by the run's rule (its Fisher pass timed), summarised in
    ``mask_summary.json`` and in ``progress``."""
    start = time.perf_counter()
    mask, progress.fisher_source = mask_rules.child_mask(
        run.settings,
        run.objective,
        run.params,
        run.data,
        run.devices,
        architecture=run.model.architecture,
    )
    progress.fisher_time_s = time.perf_counter() - start
    progress.d_mask_uniform_leaves = uniform_leaf_names(mask)
    summary = mask_rules.mask_summary(mask, run.reserve_p)
    progress.kept_fraction = summary["kept_fraction_encoder_layers"]
    summary["fisher_time_s"] = progress.fisher_time_s
    summary["fisher_source"] = progress.fisher_source
    path = os.path.join(run.settings.outputs.output_dir, "mask_summary.json")
    outputs.write_json(path, summary)
    print(
        f"Fisher information: {progress.fisher_time_s:.1f}s; child network keeps "
        f"{summary['kept_fraction_encoder_layers']:.3f} of encoder-layer weights"
    )
    return mask


def save_checkpoint(run: Run, state: TrainState, progress: Progress, losses: list[float]) -> None:
    """Saves the state with where the data stream stands (epoch e's order is
    ``epoch_order(seed, e)``) and the losses since the last log line."""
    epoch, batch = divmod(progress.step, run.steps_per_epoch)
    progress.data_order = {"seed": run.settings.seed, "epoch": epoch, "batch": batch}
    progress.interval_losses = losses
    checkpoints.save_checkpoint(run.manager, state, progress.to_json())


def evaluate_epoch(
    run: Run, eval_step: Callable, state: TrainState, progress: Progress, epoch: int
) -> dict[str, float]:
    """The dev metrics after 0-based ``epoch``, timed and added to ``progress.history``."""
    start = time.perf_counter()
    metrics = steps.evaluate(eval_step, state.params, run.data, run.devices, run.global_batch)
    progress.eval_time_s += time.perf_counter() - start
    progress.history.append({"epoch": epoch + 1, "step": progress.step, "eval": metrics})
    return metrics


def train_loop(
    run: Run,
    state: TrainState,
    tx: optax.GradientTransformation,
    progress: Progress,
    on_evaluation: Callable[[TrainState, Progress], None] | None = None,
    stop: StopRequest | None = None,
) -> TrainState | None:
    """Trains from ``progress.step`` to the end, evaluating and checkpointing on the way.

    ``state`` is replicated over the devices (its params held flat with ``run.held``);
    ``progress`` is updated in place; ``on_evaluation`` is called after each evaluation. Returns
    the final state (params as the tree), or ``None`` if ``stop_after_steps`` or a signal
    (``stop``, after a checkpoint) stopped the run.
    """
    outs, mode = run.settings.outputs, run.settings.child_tuning.mode
    as_tree = lambda state: held_flat.tree_state(run.held, state, run.devices)
    stop = stop or StopRequest(outs.log_every_steps)
    p_train_step, p_eval_step = run.train_step(tx), run.eval_step()
    log = outputs.TrainingLog(
        outs.output_dir,
        outs.tensorboard,
        step=progress.step,
        total_steps=run.total_steps,
        desc=f"{run.task.name} {mode}",
        interval_losses=progress.interval_losses,
        kept_fraction={"vanilla": 1.0, "F": run.reserve_p}.get(mode, progress.kept_fraction),
    )
    pending = device_feed.PendingMetrics()
    while progress.step < run.total_steps:
        epoch, start_batch = divmod(progress.step, run.steps_per_epoch)
        clock = EpochClock(progress)
        batches = device_feed.prefetch_to_device(run.epoch_batches(epoch, start_batch), run.devices)
        for batch in batches:
            state, metrics = p_train_step(state, batch, run.step_rng(progress.step))
            pending.add(metrics)
            progress.step += 1
            step = progress.step
            interval = step % outs.log_every_steps == 0 or step % run.steps_per_epoch == 0
            checkpoint = step % outs.checkpoint_every_steps == 0 and step % run.steps_per_epoch
            stopping = bool(step % run.steps_per_epoch) and stop.requested(step)  # a signal
            if not (interval or checkpoint or stopping or step == outs.stop_after_steps):
                continue  # the metrics stay on the devices: the host does not wait
            fetched = pending.fetch()
            learning_rate = float(jax.device_get(run.schedule(step - 1)))
            log.steps([float(m["loss"][0]) for m in fetched], learning_rate)
            if interval:
                log.interval(step, epoch + 1, learning_rate, float(fetched[-1]["grad_norm"][0]))
            if step == outs.stop_after_steps:
                log.close()
                return None
            if stopping or checkpoint:
                clock.lap()
                save_checkpoint(run, as_tree(state), progress, log.interval_losses)
            if stopping:  # a signal: stop after this step's checkpoint
                log.close()
                return None
        progress.epoch_train_time_s.append(clock.lap())
        tree = as_tree(state)
        if outs.eval_every_epoch or progress.step == run.total_steps:
            metrics = evaluate_epoch(run, p_eval_step, tree, progress, epoch)
            log.evaluation(progress.step, epoch + 1, metrics)
            if on_evaluation is not None:
                on_evaluation(tree, progress)
        save_checkpoint(run, tree, progress, log.interval_losses)
        del tree
        if progress.step < run.total_steps and stop.requested(progress.step, agree=True):
            log.close()
            return None
        log.restart(progress.step)  # the next interval does not count evaluation
    log.close()
    return as_tree(state)


best_epoch = task_metrics.best_epoch  # the epoch with the highest first metric of the task


def results_of(run: Run, progress: Progress, extra: dict[str, Any]) -> dict:
    """The run's ``results.json`` (``extra``: the extra evaluation sets' scores)."""
    run_settings, task, history = run.settings, run.task, progress.history
    config = run_settings.config
    best = best_epoch(history, task)
    dev_sizes = zip(task.dev_sets, run.data.dev, strict=True)
    predictor, baseline = task_metrics.trivial_baseline(
        task, run.data.train["labels"], run.data.dev[0]["labels"]
    )
    return {
        "task": task.name,
        "labels": list(task.labels),  # label id i is labels[i]; empty for regression
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
        "extra_eval": extra,
        "fisher_time_s": progress.fisher_time_s,
        "fisher_source": progress.fisher_source,
        "train_time_s": progress.train_time_s,
        "epoch_train_time_s": progress.epoch_train_time_s,
        "eval_time_s": progress.eval_time_s,
        "config": config,
    }


def train_and_evaluate(config: ml_collections.ConfigDict) -> Any:
    """Fine-tunes ``config.model`` on ``config.task``.

    Bad input is reported before any model weight is loaded. Writes checkpoints, ``metrics.jsonl``,
    ``results.json``, ``model/``, ``predictions/`` (and ``mask_summary.json`` for ChildTuning-D) to
    ``config.output_dir``; ``config.do_train=False`` evaluates and predicts only
    (:mod:`childtuning_trainer.evaluation`).

    Returns:
      ``(results, params)``: the results also written to ``output_dir/results.json``, and the final
      parameters on the host (``None`` if ``resume`` found the run finished: nothing is done).
      ``None`` when ``config.stop_after_steps`` ended the run early. With ``config.group_seeds``
      or ``group_runs``: a list of those pairs, one per run
      (:func:`childtuning_trainer.group_loop.train_group`).

    Raises:
      interruption.Interrupted: SIGINT or SIGTERM stopped the run (after a checkpoint).
    """
    compilation.use_cache(config.get("compilation_cache_dir", ""))
    compiled_before = compilation.programs()
    if config.get("group_seeds") or config.get("group_runs"):  # several runs as one program
        configs = run_groups.group_configs(config)
        return group_loop.train_group(configs, config.output_dir, results_of)
    run_settings = Settings.from_config(config)
    if not run_settings.outputs.do_train:
        return evaluation.evaluate_only(run_settings)
    if (finished := run_folder.finished_results(run_settings)) is not None:
        print(f"{run_settings.outputs.output_dir!r} holds a finished run; nothing to do.")
        return finished, None
    with StopRequest(run_settings.outputs.log_every_steps) as stop:
        return _train_and_evaluate(run_settings, stop, compiled_before)


def _train_and_evaluate(
    run_settings: Settings, stop: StopRequest, compiled_before: dict[str, int]
) -> tuple[dict, Any] | None:
    run = prepare(run_settings)
    stop.take_signals()  # back from jax.distributed's SIGTERM handler
    host_state, tx, progress = initial_state(run)
    run.record_shape(progress)
    state = parallel.replicate(host_state, run.devices)
    del host_state
    run.params = None  # the devices hold the parameters now
    best = final_outputs.BestModel(run) if run.settings.outputs.save_best else None
    state = train_loop(run, state, tx, progress, best.update if best else None, stop)
    run.manager.wait_until_finished()
    run.manager.close()
    if state is None:
        stop.raise_if_stopped(progress.step)
        return None
    extra = extra_eval.evaluate(
        run.extra_sets,
        run.model,
        state.params,
        run.task.labels,
        run.devices,
        run.global_batch,
        run.data.padding,
    )
    results = results_of(run, progress, extra)
    results.update(compilation.run_report(run.devices, compiled_before))
    host_params = parallel.to_host(state.params)
    results.update(final_outputs.finish(run, state.params, host_params, progress, best))
    outputs.write_json(os.path.join(run.settings.outputs.output_dir, "results.json"), results)
    return results, host_params
