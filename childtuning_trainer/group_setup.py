"""A run group's inputs and starting state: its runs, one vmapped Fisher pass, the stacked state.

:func:`prepare_group` prepares every run as alone (:func:`~childtuning_trainer.run_setup.prepare`:
its data, head, buckets and output folder, after the group's own folder); :func:`group_fisher`
computes the Fisher information
of the D runs as one program (the library's ``fisher_step`` vmapped over the runs, each on its own
batches in its own order, as :func:`~childtuning_trainer.mask_rules.fisher_pass` alone);
:func:`initial_group_state` stacks the runs' states for :mod:`childtuning_trainer.group_loop`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from childtuning_jax import fisher_mean, fisher_step, uniform_leaf_names
from childtuning_jax.models.blocks import canonical_length
from childtuning_trainer import (
    checkpoints,
    distributed,
    input_pipeline,
    mask_rules,
    optimizer_chain,
    outputs,
    parallel,
    run_folder,
    run_groups,
)
from childtuning_trainer.objective import weighted_sum
from childtuning_trainer.progress import Progress
from childtuning_trainer.run_setup import Run, prepare
from childtuning_trainer.settings import Settings
from childtuning_trainer.steps import TrainState


@dataclasses.dataclass
class Group:
    """The runs trained together, where the group checkpoints, and the shared shape."""

    runs: list[Run]
    manager: ocp.CheckpointManager  # the group's checkpoints (the stacked state, every Progress)
    flat: bool = False  # the flat optimizer chain (optimizer_chain.uses_flat_update)
    uniform: list[str] | None = None  # D's shared mask layout (None: an F group)

    @property
    def lead(self) -> Run:
        return self.runs[0]

    @property
    def devices(self) -> parallel.Layout:
        return self.lead.devices

    @property
    def paddings(self) -> list[Any]:
        return [run.data.padding for run in self.runs]


def prepare_group(configs: Sequence[Any], group_dir: str) -> Group:
    """Checks that the configs can share a program and claims the group's folder and its runs'
    (``run_folder``: each refused when it holds anything, unless ``resume`` or ``overwrite``),
    then prepares each run as alone."""
    settings = [Settings.from_config(c) for c in configs]
    run_groups.check_groupable([s.config for s in settings])
    outs = dataclasses.replace(settings[0].outputs, output_dir=group_dir)
    distributed.initialize(settings[0].parallelism)  # before the folders' barriers
    run_folder.check(outs, kind="group")
    for s in settings:  # every folder checked before any is written
        run_folder.check(s.outputs)
    run_folder.claim(outs, run_folder.GROUP_FILES, kind="group")
    runs = [prepare(s) for s in settings]
    shapes = {(r.total_steps, r.steps_per_epoch, r.global_batch) for r in runs}
    if len(shapes) > 1:
        raise ValueError(f"the runs of a group need the same steps and batch, not {shapes}.")
    check_dropout_exact(runs)
    manager = checkpoints.checkpoint_manager(outs)
    return Group(runs, manager, optimizer_chain.uses_flat_update(settings[0].optimizer))


def fisher_order(run: Run) -> np.ndarray:
    """The order of the run's Fisher pass, as alone (``mask_rules.fisher_pass``)."""
    limit = run.settings.child_tuning.fisher_max_train_samples
    return input_pipeline.fisher_order(run.data.num_train_examples, limit, run.settings.seed)


def padded_lengths(run: Run) -> np.ndarray:
    """The length the run alone pads each of its batches to: its Fisher pass's, then every
    epoch's training batches (``Padding.length``)."""
    data, seed = run.data, run.settings.seed
    orders = [fisher_order(run)] + [
        input_pipeline.epoch_order(seed, e, data.num_train_examples)
        for e in range(run.settings.num_train_epochs)
    ]
    size = run.global_batch
    longest = np.concatenate([input_pipeline.batch_lengths(data.train, o, size) for o in orders])
    buckets = np.asarray(data.padding.buckets)
    return buckets[np.minimum(np.searchsorted(buckets, longest), len(buckets) - 1)]


def check_dropout_exact(runs: Sequence[Run]) -> None:
    """Refuses, in one line, a group with dropout whose model draws its dropout masks by position
    in the padded tensor (no maximum length: XLNet, ``blocks.dropout``) when its runs pad a batch
    to different lengths: their masks would then depend on the group."""
    lead = runs[0]
    if not lead.settings.model.has_dropout or lead.model.architecture is None:
        return
    architecture = json.loads(lead.model.architecture)
    if canonical_length(types.SimpleNamespace(**architecture)):
        return  # masks by position within the model's maximum length: as alone
    lengths = [padded_lengths(run) for run in runs]
    if all(np.array_equal(lengths[0], other) for other in lengths[1:]):
        return
    raise ValueError(
        f"config.model={lead.settings.model.name!r} ({architecture.get('model_type')}) draws "
        "dropout by position in the padded batch, and this group's runs pad their batches to "
        "different lengths, so the group would not be exact; set --config.dropout=0.0 or "
        "--config.padding=max_length, or train the runs alone."
    )


def chain_settings(settings: Settings) -> Settings:
    """The run's settings for the group chain: vanilla as ChildTuning-D (all-True mask)."""
    if settings.child_tuning.mode != "vanilla":
        return settings
    child = dataclasses.replace(settings.child_tuning, mode="D")
    return dataclasses.replace(settings, child_tuning=child)


def group_optimizer(group: Group, params: Any) -> optax.GradientTransformation:
    """The lead run's chain (``run_optimizer``) with the learning rate read from each run's
    state and D's mask in the group layout (``params``: names and shapes only)."""
    lead = group.lead
    settings = chain_settings(lead.settings)
    template = None
    if group.uniform is not None:
        template = run_groups.group_template(params, group.uniform)
    warmup, total = settings.optimizer.warmup_ratio, lead.total_steps
    return run_groups.per_run_learning_rate(
        lambda schedule: optimizer_chain.run_optimizer(
            settings, params, schedule, mask=template, flat=group.flat
        ),
        lambda peak: optimizer_chain.learning_rate_schedule(peak, warmup, total),
    )


def run_state(group: Group, run: Run, params: Any, mask: Any) -> TrainState:
    """One run's step-0 state for the group chain (its own F key, learning rate and mask).

    The chain's own ``init`` with the run's mask, when its D state has the group layout's
    shapes (always for a layout fixed by the params, as a flat update's); otherwise the mask
    packed in the group layout (:func:`~childtuning_trainer.run_groups.group_child_state`).
    """
    settings = chain_settings(run.settings)
    init = lambda m: optimizer_chain.run_optimizer(
        settings, params, run.schedule, mask=m, flat=group.flat
    ).init(params)
    inner = init(mask)
    if group.uniform is not None:
        template = init(run_groups.group_template(params, group.uniform))
        if jax.tree.map(np.shape, inner) != jax.tree.map(np.shape, template):
            own = run_groups.group_child_state(mask, group.uniform)
            inner = run_groups.with_child_state(template, own)
    learning_rate = run_groups.init_per_run(run.settings.optimizer.learning_rate, inner)
    return TrainState(jnp.zeros((), jnp.int32), params, learning_rate)


def group_fisher(group: Group, runs: Sequence[Run], params: Sequence[Any]) -> list[Any]:
    """The Fisher information of each of ``runs`` (host float32 trees), as ``fisher_pass`` gives
    it alone, from one vmapped program: step ``i`` holds every run's batch ``i`` cut to one
    length. The runs draw their own dropout keys."""
    lead, devices = runs[0], group.devices
    step = fisher_step(
        weighted_sum(lead.objective),
        max_grad_norm=lead.settings.optimizer.max_grad_norm,
        axis_name=parallel.AXIS,
    )
    roles = [parallel.REPLICATED, parallel.REPLICATED, parallel.SHARDED]
    dropout = lead.settings.model.has_dropout
    if dropout:  # the runs' keys, one per run: vmapped like the state
        vstep, roles = jax.vmap(step, (0, 0, 1, 0)), [*roles, parallel.SHARED]
    else:
        vstep = jax.vmap(lambda acc, p, batch: step(acc, p, batch, None), (0, 0, 1))
    mapped = parallel.map_step(vstep, devices, roles, parallel.REPLICATED, (0,))
    shares = len(devices)
    streams = [
        input_pipeline.fisher_batches(run.data.train, fisher_order(run), run.global_batch, shares)
        for run in runs
    ]
    keys = jnp.stack([jax.random.fold_in(jax.random.key(r.settings.seed), 2) for r in runs])
    zeros = jax.tree.map(lambda p: np.zeros((len(runs), *np.shape(p)), np.float32), params[0])
    acc = parallel.replicate(zeros, devices)
    stacked = parallel.replicate(run_groups.stack(params), devices)
    paddings = [r.data.padding for r in runs]
    count = 0
    for index, batches in enumerate(zip(*streams, strict=True)):
        batch = parallel.shard_batch(run_groups.group_batch(batches, paddings), devices)
        args = (jax.vmap(jax.random.fold_in, (0, None))(keys, index),) if dropout else ()
        acc = mapped(acc, stacked, batch, *args)
        count += 1
    total = distributed.broadcast(parallel.to_host(acc))
    means = [
        fisher_mean(jax.tree.map(jnp.asarray, run_groups.unstack(total, i)), count)
        for i in range(len(runs))
    ]
    return [jax.tree.map(np.asarray, m) for m in means]


def child_masks(group: Group, progresses: Sequence[Progress]) -> list[Any]:
    """Each run's mask (vanilla: all True; D: its rule, on its Fisher pass), its params pruned
    for the pruning ablation, and each D run's ``mask_summary.json``."""
    runs = group.runs
    start = time.perf_counter()
    d_runs = [i for i, r in enumerate(runs) if r.settings.child_tuning.mode == "D"]
    needs_fisher = [i for i in d_runs if runs[i].settings.child_tuning.mask_rule != "random"]
    fishers = {}
    if needs_fisher:
        passes = group_fisher(
            group, [runs[i] for i in needs_fisher], [runs[i].params for i in needs_fisher]
        )
        fishers = dict(zip(needs_fisher, passes, strict=True))
    elapsed = time.perf_counter() - start
    masks = []
    for i, (run, progress) in enumerate(zip(runs, progresses, strict=True)):
        if i not in d_runs:
            masks.append(run_groups.all_true_mask(run.params))
            continue
        child = run.settings.child_tuning
        rule = mask_rules.get_mask_rule(child.mask_rule)
        fisher = lambda i=i: fishers[i]
        inputs = mask_rules.MaskInputs(run.params, child.reserve_p, run.settings.seed, fisher)
        mask = jax.tree.map(np.asarray, rule(inputs))
        if child.prune:
            run.params = mask_rules.prune(run.params, mask)
        progress.fisher_time_s = elapsed
        progress.fisher_source = "computed" if i in fishers else None
        progress.d_mask_uniform_leaves = uniform_leaf_names(mask)
        summary = mask_rules.mask_summary(mask, run.reserve_p)
        progress.kept_fraction = summary["kept_fraction_encoder_layers"]
        summary.update(fisher_time_s=elapsed, fisher_source=progress.fisher_source)
        path = os.path.join(run.settings.outputs.output_dir, "mask_summary.json")
        outputs.write_json(path, summary)
        masks.append(mask)
    return masks


def initial_group_state(group: Group) -> tuple[TrainState, list[Progress]]:
    """Step 0 for every run (after the group's Fisher pass), stacked on the host."""
    progresses = [Progress() for _ in group.runs]
    masks = [None] * len(group.runs)
    if group.lead.settings.child_tuning.mode != "F":
        masks = child_masks(group, progresses)
        group.uniform = run_groups.shared_uniform_leaves(masks)
    states = [
        run_state(group, run, run.params, mask) for run, mask in zip(group.runs, masks, strict=True)
    ]
    return run_groups.stack(states), progresses


def template_state(group: Group) -> TrainState:
    """A stacked state of the right layout (a restore target; the values are replaced)."""
    mask = None
    if group.uniform is not None:
        mask = run_groups.group_template(group.lead.params, group.uniform)
    states = [run_state(group, run, run.params, mask) for run in group.runs]
    return run_groups.stack(states)
