"""Data parallelism for the trainer: its devices, the axis name, replication, and batch shares.

Everything the training loop needs to know about where arrays live goes through this module:
the local devices a run uses, the ``pmap`` axis (the mesh axis of :mod:`childtuning_jax.parallel`,
so placed arrays need no resharding), placing the state and the batches, and taking a replicated
state back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from childtuning_jax import parallel as placement

AXIS = "devices"


def select_devices(num_devices: int) -> list[jax.Device]:
    """The first ``num_devices`` local devices (all of them for 0)."""
    devices = jax.local_devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices}, but {len(devices)} are available.")
    return devices[:num_devices] if num_devices else devices


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """One copy of every leaf per device (stacked on a leading device axis)."""
    return placement.replicate(tree, devices)


def shard_batch(batch: Any, devices: Sequence[jax.Device]) -> Any:
    """This host's share of a global batch, split over its devices along the leading axis."""
    return placement.shard(batch, devices)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree."""
    return placement.unreplicate(tree)


def to_host(tree: Any) -> Any:
    """A replicated tree as host (numpy) arrays, one copy."""
    return jax.device_get(unreplicate(tree))


def map_train_step(step: Callable, devices: Sequence[jax.Device]) -> Callable:
    """``step(state, batch, rng)`` mapped over ``devices``: state and batch split, ``rng`` shared,
    the state's buffers donated."""
    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), devices=devices, donate_argnums=0)


def map_eval_step(step: Callable, devices: Sequence[jax.Device]) -> Callable:
    """``step(params, batch)`` mapped over ``devices``."""
    return jax.pmap(step, axis_name=AXIS, devices=devices)
