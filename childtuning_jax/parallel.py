"""Placing pytrees for ``jax.pmap`` data parallelism with current JAX APIs.

``jax.device_put_replicated`` and ``jax.device_put_sharded`` are deprecated; these helpers build the
same stacked-over-devices arrays with ``jax.device_put`` and a ``NamedSharding`` over a 1-D mesh, so
``pmap`` consumes them without another transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def device_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    """A sharding that splits an array's leading axis over ``devices``, one slice each."""
    return NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Stacks one copy of every leaf per device: leaf ``x`` becomes ``(len(devices), *x.shape)``.

    Each device receives its own copy directly; no stacked copy is built on one device first.
    """
    sharding = device_sharding(devices)

    def put(leaf: Any) -> jax.Array:
        leaf = jax.numpy.asarray(leaf)
        shards = [jax.device_put(leaf[None], device) for device in devices]
        return jax.make_array_from_single_device_arrays(
            (len(devices), *leaf.shape), sharding, shards
        )

    return jax.tree.map(put, tree)


def shard(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Splits every leaf's leading axis into ``len(devices)`` equal parts, one per device.

    A leaf of shape ``(n, ...)`` becomes ``(len(devices), n // len(devices), ...)``; ``n`` must be a
    multiple of the number of devices.
    """
    num_devices = len(devices)
    sharding = device_sharding(devices)

    def put(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        if leaf.ndim == 0 or leaf.shape[0] % num_devices:
            raise ValueError(
                f"cannot split a leading axis of shape {leaf.shape} over {num_devices} devices"
            )
        stacked = leaf.reshape(num_devices, leaf.shape[0] // num_devices, *leaf.shape[1:])
        return jax.device_put(stacked, sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every leaf of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)
