"""Data parallelism for the trainer: its devices, the axis name, replication, and batch shares.

Everything the training loop needs to know about where arrays live goes through this module. A
:class:`Layout` is the run's devices (every process's, process by process) and how steps are
mapped over them:

* ``"pmap"`` (the default): ``jax.pmap`` over the devices; the state holds one copy per local
  device, stacked on a leading axis, and every process passes its local share.
* ``"jit"``: ``jax.jit`` over a :class:`~jax.sharding.Mesh` with one ``data`` axis; the state is
  one array per leaf, replicated (``PartitionSpec()``), and the batch is sharded over ``data``.

Steps are written per device, with collectives over :data:`AXIS`. Under ``"jit"`` the same step
is ``jax.vmap``-ped over the device axis of the batch with that axis name, so both layouts
compute the same thing: the same per-device dropout keys, the same cross-device sums. Batches
keep the same form in both: ``(num_devices, per_device_batch, ...)``.

A model too large for one chip would shard the state over a second mesh axis: that is
:func:`state_sharding`'s rule, and :data:`MESH_AXES` would gain the axis (not built).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"  # the per-device step's axis name (pmap's axis; the vmapped axis under jit)
DATA_AXIS = "data"  # the mesh axis the batch is sharded over (jit)
MESH_AXES = (DATA_AXIS,)
PARALLELISMS = ("pmap", "jit")

# How a mapped step treats each argument and result.
REPLICATED = "replicated"  # the same value on every device (state, params)
SHARDED = "sharded"  # split over the devices on its leading axis (batches, logits)
SHARED = "shared"  # one host value passed to every device as is (a PRNG key)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The run's devices, process by process (the mesh order), and the parallelism kind.

    Behaves as the sequence of those devices (``len`` is the global device count).
    """

    kind: str
    devices: tuple[jax.Device, ...]

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[jax.Device]:
        return iter(self.devices)

    def __getitem__(self, index: int) -> jax.Device:
        return self.devices[index]

    @property
    def local_devices(self) -> list[jax.Device]:
        return [d for d in self.devices if d.process_index == jax.process_index()]

    @property
    def local_offset(self) -> int:
        """The position of this process's first device (its devices are consecutive)."""
        return self.devices.index(self.local_devices[0])

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), MESH_AXES)

    def sharding(self, role: str) -> NamedSharding:
        """The ``jit`` layout's sharding of a ``REPLICATED`` or ``SHARDED`` array."""
        spec = PartitionSpec(DATA_AXIS) if role == SHARDED else PartitionSpec()
        return NamedSharding(self.mesh, spec)


def as_layout(devices: Sequence[jax.Device] | Layout) -> Layout:
    """``devices`` as a :class:`Layout` (a plain list of local devices: ``pmap`` over them)."""
    return devices if isinstance(devices, Layout) else Layout("pmap", tuple(devices))


def select_devices(num_devices: int, parallelism: str = "pmap") -> Layout:
    """The run's devices: the first ``num_devices`` local devices (all of them for 0) of every
    process (a multi-process run uses all of them), mapped by ``parallelism``."""
    if parallelism not in PARALLELISMS:
        raise ValueError(
            f"Unknown parallelism {parallelism!r}; expected one of {', '.join(PARALLELISMS)}."
        )
    local = jax.local_devices()
    if num_devices < 0 or num_devices > len(local):
        raise ValueError(f"config.num_devices={num_devices}, but {len(local)} are available.")
    if jax.process_count() == 1:
        return Layout(parallelism, tuple(local[:num_devices] if num_devices else local))
    if num_devices not in (0, len(local)):
        raise ValueError(
            f"config.num_devices={num_devices}: a multi-process run uses every local device "
            f"({len(local)} here); set it to 0."
        )
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Layout(parallelism, tuple(devices))


def _stacked(devices: Sequence[jax.Device]) -> NamedSharding:
    """``pmap``'s placement: an array's leading axis split over ``devices``, one slice each."""
    return NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))


def _replicate_stacked(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """One copy of every leaf per device, stacked: ``x`` becomes ``(len(devices), *x.shape)``.

    Each device receives its own copy directly; no stacked copy is built on one device first.
    """
    sharding = _stacked(devices)

    def put(leaf: Any) -> jax.Array:
        leaf = jax.numpy.asarray(leaf)
        shards = [jax.device_put(leaf[None], device) for device in devices]
        return jax.make_array_from_single_device_arrays(
            (len(devices), *leaf.shape), sharding, shards
        )

    return jax.tree.map(put, tree)


def state_sharding(layout: Layout, tree: Any) -> Any:
    """The ``jit`` layout's sharding of every state leaf: replicated (a model axis would go
    here)."""
    return jax.tree.map(lambda _: layout.sharding(REPLICATED), tree)


def replicate(tree: Any, devices: Sequence[jax.Device] | Layout) -> Any:
    """The same host ``tree`` on every device: one stacked copy per local device (``pmap``), or
    one replicated global array per leaf (``jit``)."""
    layout = as_layout(devices)
    if layout.kind == "pmap":
        return _replicate_stacked(tree, layout.local_devices)

    def put(leaf: Any, sharding: NamedSharding) -> jax.Array:
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, state_sharding(layout, tree))


def shard_batch(batch: Any, devices: Sequence[jax.Device] | Layout) -> Any:
    """This process's share of a global batch (the rows of its devices), split over its devices:
    every leaf ``(n, ...)`` becomes ``(num_devices, n // num_devices, ...)`` globally."""
    layout = as_layout(devices)
    local = layout.local_devices
    offset = layout.local_offset

    def share(leaf: Any) -> np.ndarray:
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % len(layout):
            raise ValueError(
                f"cannot split a leading axis of shape {leaf.shape} over {len(layout)} devices"
            )
        rows = leaf.shape[0] // len(layout)
        return leaf[offset * rows : (offset + len(local)) * rows]

    shares = jax.tree.map(share, batch)
    stack = lambda leaf: leaf.reshape(len(local), -1, *leaf.shape[1:])
    if layout.kind == "pmap":
        sharding = _stacked(local)
        return jax.tree.map(lambda leaf: jax.device_put(stack(leaf), sharding), shares)
    sharding = layout.sharding(SHARDED)

    def put(leaf: np.ndarray) -> jax.Array:
        stacked = stack(leaf)
        global_shape = (len(layout), *stacked.shape[1:])
        return jax.make_array_from_process_local_data(sharding, stacked, global_shape)

    return jax.tree.map(put, shares)


def unreplicate(tree: Any) -> Any:
    """One copy of every leaf of a replicated tree (as device arrays)."""
    return jax.tree.map(_first_copy, tree)


def _first_copy(leaf: Any) -> Any:
    """A leaf replicated by its sharding (``jit``) as is, locally; a stacked one (``pmap``, or a
    host array) its first row."""
    if not isinstance(leaf, jax.Array):
        return leaf[0]
    spec = getattr(leaf.sharding, "spec", None)
    data = leaf.addressable_data(0)
    if spec is not None and all(axis is None for axis in spec):
        return data
    return data[0]


def to_host(tree: Any) -> Any:
    """A replicated tree (either layout) as host (numpy) arrays, one copy."""
    return jax.device_get(unreplicate(tree))


def gather(tree: Any) -> Any:
    """A tree split over the devices (every process's part) as whole host arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def map_step(
    step: Callable,
    devices: Sequence[jax.Device] | Layout,
    in_roles: Sequence[str],
    out_roles: Any,
    donate_argnums: tuple[int, ...] = (),
) -> Callable:
    """``step`` (written per device, collectives over :data:`AXIS`) mapped over the layout.

    ``in_roles``: one role per argument; ``out_roles``: a role per result (a prefix tree).
    """
    layout = as_layout(devices)
    if layout.kind == "pmap":
        axis = lambda role: None if role == SHARED else 0
        return jax.pmap(
            step,
            axis_name=AXIS,
            in_axes=tuple(axis(r) for r in in_roles),
            out_axes=jax.tree.map(axis, out_roles),
            devices=list(layout.devices),
            donate_argnums=donate_argnums,
        )
    axis = lambda role: 0 if role == SHARDED else None
    vmapped = jax.vmap(
        step,
        in_axes=tuple(axis(r) for r in in_roles),
        out_axes=jax.tree.map(axis, out_roles),
        axis_name=AXIS,
    )
    out_shardings = jax.tree.map(layout.sharding, out_roles)
    return jax.jit(vmapped, out_shardings=out_shardings, donate_argnums=donate_argnums)


def map_train_step(step: Callable, devices: Sequence[jax.Device] | Layout) -> Callable:
    """``step(state, batch, rng)`` mapped over the devices: state replicated and donated, batch
    split, ``rng`` shared. Its metrics come back with a leading local-device axis (``m[0]``)."""
    layout = as_layout(devices)
    mapped = map_step(step, layout, (REPLICATED, SHARDED, SHARED), (REPLICATED, REPLICATED), (0,))
    if layout.kind == "pmap":
        return mapped

    def train_step(state: Any, batch: Any, rng: jax.Array) -> tuple[Any, Any]:
        state, metrics = mapped(state, batch, rng)
        return state, jax.tree.map(lambda m: m.addressable_data(0)[None], metrics)

    return train_step


def map_eval_step(step: Callable, devices: Sequence[jax.Device] | Layout) -> Callable:
    """``step(params, batch)`` mapped over the devices; returns every process's outputs on the
    host, ``(num_devices, per_device_batch, ...)``."""
    mapped = map_step(step, devices, (REPLICATED, SHARDED), SHARDED)
    return lambda params, batch: gather(mapped(params, batch))
