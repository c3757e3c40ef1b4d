"""Params held flat through training: the train state's params as the flat chain's buffers.

With the flat chain (``config.flat_update``), the train state holds the params as the buffers of
the chain's :class:`~childtuning_jax.FlatLayout` (``layout.flatten(params)``), so a step does no
concatenation or slicing of params, gradients, moments or updates:

* the model runs on ``layout.view(params)``, whose gradient is the flat buffers (one concatenate
  per buffer), summed over the devices as a few arrays;
* the chain runs on the buffers without :func:`~childtuning_jax.flat_update`'s wrapper
  (``optimizer_chain.run_optimizer(held=True)``), so its state is the wrapper's, and
  ``optax.apply_updates`` updates the buffers.

What needs the tree gets it at its boundary, outside the per-step path (:func:`tree_state`):
evaluation, ``save_best``, ``model/`` and the checkpoints. A checkpoint holds the params as the
tree, and the optimizer state as the flat chain's, so every checkpoint, written flat (held or
not) or per leaf, resumes as before (:func:`hold`). Mixout hands its anchor to the model as a tree,
so its runs keep the wrapper (params as the tree), as does a run group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import FlatLayout
from childtuning_trainer import optimizer_chain, parallel
from childtuning_trainer.objective import Objective
from childtuning_trainer.steps import TrainState

if TYPE_CHECKING:
    from childtuning_trainer.settings import Settings


def holds_flat(settings: Settings, flat: bool) -> bool:
    """Whether a run whose chain is ``flat`` holds its params flat (not Mixout's: its anchor)."""
    return flat and settings.regularizer.name != "mixout"


def run_optimizer(
    settings: Settings,
    params: Any,
    schedule: optax.Schedule,
    *,
    mask: Any,
    flat: bool,
) -> tuple[optax.GradientTransformation, FlatLayout | None]:
    """The run's chain (``optimizer_chain.run_optimizer``) and the layout its params are held
    in (``None``: the params stay a tree)."""
    if not holds_flat(settings, flat):
        tx = optimizer_chain.run_optimizer(settings, params, schedule, mask=mask, flat=flat)
        return tx, None
    return optimizer_chain.run_optimizer(
        settings, params, schedule, mask=mask, flat=True, held=True
    )


def flatten_on_host(layout: FlatLayout, params: Any) -> dict[str, np.ndarray]:
    """``layout.flatten(params)`` as host arrays (numpy), ready to replicate."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
    if len(leaves) != len(layout.shapes):
        raise ValueError(f"params have {len(leaves)} leaves but the layout {len(layout.shapes)}")
    return {
        key: np.concatenate([leaves[i].reshape(-1) for i in members])
        for key, members in layout.members.items()
    }


def initial_state(
    layout: FlatLayout | None, params: Any, tx: optax.GradientTransformation
) -> TrainState:
    """The state at step 0: the params flat in ``layout``, or the tree without one."""
    held = params if layout is None else layout.flatten(params)
    return TrainState(jnp.zeros((), jnp.int32), held, tx.init(held))


def hold(layout: FlatLayout | None, state: TrainState) -> TrainState:
    """A restored host state (params as the tree, as checkpoints hold them) in ``layout``."""
    return state if layout is None else state._replace(params=flatten_on_host(layout, state.params))


def objective(layout: FlatLayout | None, tree_objective: Objective) -> Objective:
    """The train step's objective of params held in ``layout``: ``tree_objective`` on the view."""
    if layout is None:
        return tree_objective
    return lambda flat, batch, rng=None: tree_objective(layout.view(flat), batch, rng)


def tree_state(layout: FlatLayout | None, state: TrainState, devices: Any) -> TrainState:
    """The replicated ``state`` with its params as the tree (a copy on the devices)."""
    if layout is None:
        return state
    to_tree = _mapped_unflatten(layout, parallel.as_layout(devices))
    return state._replace(params=to_tree(state.params))


@functools.lru_cache(maxsize=8)
def _mapped_unflatten(layout: FlatLayout, devices: parallel.Layout) -> Callable:
    """``layout.unflatten`` over replicated buffers, per device (pmap) or replicated (jit)."""
    if devices.kind == "pmap":
        return jax.pmap(layout.unflatten, axis_name=parallel.AXIS, devices=list(devices))
    return jax.jit(layout.unflatten, out_shardings=devices.sharding(parallel.REPLICATED))
