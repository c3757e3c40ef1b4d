"""Run groups: several fine-tunes stacked along a leading axis and trained as one program.

A group is a list of runs (each a full config with its own ``output_dir``) that may differ only
in :data:`VARYING_KEYS`: the seed (data order, dropout, head initialisation, F's key), the
learning rate and ``reserve_p`` (values in the stacked state, not constants of the program), and
the mode within {vanilla, D} (vanilla is D with an all-True mask) or F alone. Everything else
(task, model, batch, schedule shape, regulariser) is shared. This module holds the pieces the
group loop (:mod:`childtuning_trainer.group_loop`) stacks with ``jax.vmap``:

* :func:`group_configs`: the runs of ``--config.group_seeds`` (one folder per seed) or of
  ``--config.group_runs`` (a JSON file of each run's overrides; the sweep writes it);
* :func:`check_groupable`: one line naming a setting the runs may not differ in;
* :func:`group_child_state`: each run's ChildTuning-D mask in one layout shared by the group;
* :func:`per_run_learning_rate`: the run's chain (``optimizer_chain.run_optimizer``) with its peak
  learning rate read from the state;
* :func:`common_length`, :func:`cut`: the runs' batches of one step padded to one length.

Padding: each run keeps its own buckets (fitted to its own batches, as alone); a step's batches
are cut to the longest of the runs' own bucket lengths. Extra positions are padding (attention
mask 0), so each run's examples, order, losses and metrics are its own up to float rounding.
Dropout masks depend on each element's position, not on the padded length (``seq_axes`` of
``childtuning_jax.models.blocks.dropout``), so they equal the lone run's with dropout on too;
except XLNet's (no maximum length, left padding), drawn per element of the padded tensor: an
XLNet group with dropout whose runs pad a batch to different lengths (different seeds, bucketed
padding) is refused in one line (``group_setup.check_dropout_exact``; dropout 0 or
``padding=max_length`` make it exact).

A group is a run in every other way: its folder and each run's are claimed as a run's
(:mod:`childtuning_trainer.run_folder`: ``overwrite`` deletes the group's checkpoints and each
run's own files), SIGINT / SIGTERM finish the step, checkpoint the group and stop it
(:mod:`childtuning_trainer.interruption`), and it runs on the run's layouts and processes
(:mod:`childtuning_trainer.parallel`, :mod:`childtuning_trainer.distributed`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import ChildTuningDState, template_child_mask, uniform_leaf_names
from childtuning_jax.leaf_layout import pack_mask_bits
from childtuning_jax.paths import leaf_names

# Settings the runs of a group may differ in (every other config key must agree).
VARYING_KEYS = ("seed", "learning_rate", "reserve_p", "mode", "mask_rule", "prune", "output_dir")
GROUP_KEYS = ("group_seeds", "group_runs")  # the group's own keys, cleared in each run's config


def parse_seeds(text: Any) -> list[int]:
    """``"42,52,57"`` (or a list or an int) as seeds; a bad item is one line naming the key."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        seeds = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise ValueError(f"config.group_seeds={text!r}: expected seeds such as 42,52,57.") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.group_seeds={text!r} repeats a seed.")
    return seeds


def member_configs(config: Any, overrides: Sequence[dict[str, Any]]) -> list[Any]:
    """One config per run: ``config`` with the run's ``overrides`` and the group keys cleared."""
    members = []
    for override in overrides:
        member = copy.deepcopy(config)
        with member.unlocked():
            for key in GROUP_KEYS:
                if key in member:
                    member[key] = ""
            member.update(override)
        members.append(member)
    return members


def seed_group(config: Any) -> list[Any]:
    """``--config.group_seeds=42,52,57``: a run per seed in ``output_dir/seed_<seed>``."""
    seeds = parse_seeds(config.group_seeds)
    out = config.output_dir
    return member_configs(
        config, [{"seed": s, "output_dir": os.path.join(out, f"seed_{s}")} for s in seeds]
    )


def listed_group(config: Any) -> list[Any]:
    """``--config.group_runs=FILE``: a JSON list of each run's overrides, each with its own
    ``output_dir`` (the sweep writes it; :mod:`childtuning_trainer.experiments.group_runner`)."""
    try:
        with open(config.group_runs) as f:
            overrides = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"config.group_runs={config.group_runs!r}: {e}") from None
    if not isinstance(overrides, list) or not all(
        isinstance(o, dict) and o.get("output_dir") for o in overrides
    ):
        raise ValueError(
            f"config.group_runs={config.group_runs!r}: expected a JSON list of objects, "
            "each with its output_dir."
        )
    return member_configs(config, overrides)


def group_configs(config: Any) -> list[Any]:
    """The runs of ``config``'s group (``group_seeds`` or ``group_runs``)."""
    if config.get("group_seeds") and config.get("group_runs"):
        raise ValueError("set config.group_seeds or config.group_runs, not both.")
    return seed_group(config) if config.get("group_seeds") else listed_group(config)


def check_groupable(configs: Sequence[dict[str, Any]]) -> None:
    """Raises one ``ValueError`` naming a setting the runs differ in but may not (or a mode mix
    other than vanilla with D, or F runs with different ``reserve_p``)."""
    first = configs[0]
    for config in configs[1:]:
        for key in sorted(set(first) | set(config)):
            if key not in VARYING_KEYS and first.get(key) != config.get(key):
                raise ValueError(
                    f"a run group shares config.{key}, but its runs have {first.get(key)!r} and "
                    f"{config.get(key)!r}; train them in separate groups."
                )
    modes = {c["mode"] for c in configs}
    if "F" in modes and len(modes) > 1:
        raise ValueError(f"a run group mixes modes {sorted(modes)}: F runs form their own group.")
    if modes == {"F"} and len({c.get("reserve_p") for c in configs}) > 1:
        raise ValueError("a group of F runs shares config.reserve_p (its threshold is compiled).")
    if first.get("save_best"):  # what a run alone does; not built for groups
        raise ValueError("config.save_best is not available in a run group; train runs alone.")
    if len({c["output_dir"] for c in configs}) < len(configs):
        raise ValueError("the runs of a group need an output_dir each.")


# -------------------------------------------------------------------------------------------
# ChildTuning-D masks in one layout
# -------------------------------------------------------------------------------------------


def all_true_mask(params: Any) -> Any:
    """Vanilla as ChildTuning-D: every gradient kept."""
    return jax.tree.map(lambda p: np.ones(np.shape(p), bool), params)


def shared_uniform_leaves(masks: Sequence[Any]) -> list[str]:
    """The leaves uniform (all True or all False) in every run's mask: the group layout keeps one
    bool for them and packed bits for every other leaf."""
    names = [set(uniform_leaf_names(m)) for m in masks]
    return [n for n in leaf_names(masks[0]) if all(n in s for s in names)]


def group_template(params: Any, uniform: Sequence[str]) -> Any:
    """A stand-in mask with the group layout (``child_tuning_d`` reads its state, not this)."""
    return template_child_mask(params, uniform)


def group_child_state(mask: Any, uniform: Sequence[str]) -> ChildTuningDState:
    """``mask`` as the ``child_tuning_d`` state of the group layout: the leaves of ``uniform``
    one bool each, every other leaf packed (``ChildTuningDState``'s format), in leaf order."""
    kept = set(uniform)
    packed, flags = [], []
    for name, leaf in zip(leaf_names(mask), jax.tree.leaves(mask), strict=True):
        leaf = np.asarray(leaf, bool)
        if name in kept:
            flags.append(bool(leaf.flat[0]) if leaf.size else False)
        else:
            packed.append(pack_mask_bits(leaf))
    return ChildTuningDState(
        mask=jnp.asarray(np.concatenate(packed) if packed else np.zeros(1, np.uint8)),
        uniform=jnp.asarray(np.asarray(flags or [False], bool)),
    )


def with_child_state(opt_state: Any, child: ChildTuningDState) -> Any:
    """``opt_state`` with its ``ChildTuningDState`` replaced by ``child``."""
    is_d = lambda node: isinstance(node, ChildTuningDState)
    return jax.tree.map(lambda node: child if is_d(node) else node, opt_state, is_leaf=is_d)


# -------------------------------------------------------------------------------------------
# The learning rate as a value of the state
# -------------------------------------------------------------------------------------------


class PerRunLearningRateState(NamedTuple):
    """The run's peak learning rate and its chain's state."""

    learning_rate: jax.Array
    inner: Any


def per_run_learning_rate(
    make_chain: Callable[[optax.Schedule], optax.GradientTransformation],
    make_schedule: Callable[[jax.Array], optax.Schedule],
) -> optax.GradientTransformation:
    """``make_chain(make_schedule(peak))`` with ``peak`` read from the state, so stacked states
    of runs with different learning rates share one program. ``init`` needs the peak:
    use :func:`init_per_run`."""

    def init_fn(params: Any) -> PerRunLearningRateState:
        raise TypeError("per_run_learning_rate: build the state with init_per_run")

    def update_fn(updates, state, params=None):
        chain = make_chain(make_schedule(state.learning_rate))
        updates, inner = chain.update(updates, state.inner, params)
        return updates, PerRunLearningRateState(state.learning_rate, inner)

    return optax.GradientTransformation(init_fn, update_fn)


def init_per_run(learning_rate: float, inner: Any) -> PerRunLearningRateState:
    return PerRunLearningRateState(jnp.asarray(learning_rate, jnp.float32), inner)


# -------------------------------------------------------------------------------------------
# Stacking and batches
# -------------------------------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """The runs' trees stacked on a new leading axis (host arrays)."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def unstack(tree: Any, index: int) -> Any:
    """Run ``index``'s slice of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


SEQUENCE_FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def cut(batch: dict[str, np.ndarray], length: int, side: str) -> dict[str, np.ndarray]:
    """``batch`` (padded to the maximum length) with its sequence features cut to ``length``
    positions on the padding ``side`` (``Padding.trim`` with a given length)."""
    keep = slice(-length, None) if side == "left" else slice(0, length)
    return {k: v[:, keep] if k in SEQUENCE_FEATURES else v for k, v in batch.items()}


def common_length(batches: Sequence[dict[str, np.ndarray]], paddings: Sequence[Any]) -> int:
    """The longest of the runs' own lengths for their batches (each run's own buckets; a run
    without padding settings: the full length)."""
    lengths = [
        p.length(b) if p is not None else b["input_ids"].shape[1]
        for b, p in zip(batches, paddings, strict=True)
    ]
    return max(lengths)


def group_batch(batches: Sequence[dict[str, np.ndarray]], paddings: Sequence[Any]) -> dict:
    """The runs' full-length batches as one: cut to :func:`common_length` and stacked on axis 1
    (rows first, so ``parallel.shard_batch`` splits the rows over the devices)."""
    length = common_length(batches, paddings)
    side = paddings[0].side if paddings[0] is not None else "right"
    cuts = [cut(b, length, side) for b in batches]
    return {k: np.stack([c[k] for c in cuts], axis=1) for k in cuts[0]}
