"""A flat optimizer update: the optimizer sees a few contiguous buffers instead of every leaf.

An optax chain over a params tree runs every elementwise step once per leaf (BERT-base: 201
leaves), so the update is a few hundred small loops. :func:`flat_update` wraps a chain so that it
sees the params, gradients and its own moments as one 1-D buffer per group of leaves, as
``optax.flatten`` does with a single buffer, but carrying the masks the recipe needs:

* a :class:`FlatLayout` (:func:`flat_layout`) groups the leaves by dtype and by per-leaf flags
  (``split_by``, e.g. the weight-decay mask), so that a per-leaf flag is one Python bool per
  buffer (:meth:`FlatLayout.buffer_flags`) and ``optax.adamw(mask=...)``, ``hf_adamw`` and the
  regularisers' anchor masks work unchanged in the flat view;
* :func:`flat_child_tuning_d` holds ChildTuning-D's mask as packed bits in the buffers' order
  and applies it to each buffer in one loop;
* :func:`flat_child_tuning_f` draws exactly the keep decisions of
  :func:`~childtuning_jax.child_tuning_f` (same key stream, same per-leaf seeds and indices), so
  the flat and per-leaf chains give the same results;
* :func:`in_leaf_view` runs any per-leaf transform inside the flat view.

Anchored transforms (``decay_to_pretrained``, ``recadam``) initialised inside the wrapper hold
their anchor as flat buffers too. Usage::

  layout = flat_layout(params, split_by=[decay_mask])
  tx = flat_update(layout, optax.chain(
      optax.clip_by_global_norm(1.0),
      flat_child_tuning_d(layout, mask),        # or flat_child_tuning_f(layout, p, key)
      optax.adamw(lr, weight_decay=0.01, mask=layout.buffer_flags(decay_mask)),
  ))

The wrapper still concatenates params and gradients and slices the updates every step. A training
loop that holds its params flat does neither: it runs the inner chain on the buffers and the model
on :meth:`FlatLayout.view`, whose gradient is flat::

  flat = layout.flatten(params)
  tx = optax.chain(clip, flat_child_tuning_d(layout, mask), adamw)  # the inner chain alone
  grads = jax.grad(lambda flat: loss(layout.view(flat), batch))(flat)
  updates, state = tx.update(grads, state, flat)
  flat = optax.apply_updates(flat, updates)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import paths
from childtuning_jax.leaf_layout import leaf_shape, pack_mask_bits, unpack_mask_bits
from childtuning_jax.task_driven import ChildTuningDState
from childtuning_jax.task_free import (
    ChildTuningFState,
    Sampler,
    check_reserve_p,
    keep_masks,
    keep_scale,
    split_key,
)


def _flag(name: str, leaf: Any) -> bool:
    values = np.asarray(leaf)
    if values.size and values.any() != values.all():
        raise ValueError(f"flag leaf '{name}' must be all True or all False")
    return bool(values.all())


class FlatLayout:
    """Where every leaf of a params tree lies in the flat buffers (static, built on the host).

    Buffer ``k`` (key ``f"{dtype}_{k}"``) holds the leaves of one dtype and one combination of
    ``split_by`` flags, each raveled in C order, in ``jax.tree.leaves`` order.
    """

    def __init__(self, params: Any, split_by: Sequence[Any] = ()):
        names = paths.leaf_names(params)
        leaves = jax.tree.leaves(params)
        self.treedef = jax.tree.structure(params)
        self.names = names
        self.shapes = [leaf_shape(leaf) for leaf in leaves]
        self.dtypes = [
            np.dtype(getattr(leaf, "dtype", None) or np.result_type(leaf)) for leaf in leaves
        ]
        flags = [
            [_flag(n, f) for n, f in zip(paths.leaf_names(t), jax.tree.leaves(t), strict=True)]
            for t in split_by
        ]
        for tree_flags in flags:
            if len(tree_flags) != len(leaves):
                raise ValueError(
                    f"a split_by tree has {len(tree_flags)} leaves but the params have "
                    f"{len(leaves)}"
                )
        groups: dict[tuple[Any, ...], str] = {}
        self.members: dict[str, list[int]] = {}
        self.slots: list[tuple[str, int, int]] = []  # per leaf: (buffer key, start, size)
        for i, dtype in enumerate(self.dtypes):
            group = (dtype.name, *(f[i] for f in flags))
            key = groups.setdefault(group, f"{dtype.name}_{len(groups)}")
            members = self.members.setdefault(key, [])
            start = sum(self.slots[j][2] for j in members)
            members.append(i)
            self.slots.append((key, start, math.prod(self.shapes[i])))
        self.keys = list(self.members)
        self.sizes = {k: sum(self.slots[i][2] for i in m) for k, m in self.members.items()}

    def flatten(self, tree: Any) -> dict[str, jax.Array]:
        """``tree`` (the params' leaves, in order and shape) as ``{buffer key: 1-D array}``."""
        return self._buffers(self._checked_leaves(tree))

    def unflatten(self, flat: dict[str, jax.Array], like: Any = None) -> Any:
        """The inverse of :meth:`flatten`, in ``like``'s tree structure (default: the params')."""
        treedef = self.treedef if like is None else jax.tree.structure(like)
        return jax.tree.unflatten(treedef, self._leaves(flat))

    def view(self, flat: dict[str, jax.Array]) -> Any:
        """The params tree of the buffers ``flat`` (as :meth:`unflatten`), for a model to run on
        params held flat: differentiable, the gradient of each buffer one concatenate of its
        leaves' gradients, so ``jax.grad(lambda flat: loss(layout.view(flat)))(flat)`` is flat.

        (The default transpose of :meth:`unflatten`'s slices pads every leaf's gradient to its
        buffer's size and sums them.)
        """
        return jax.tree.unflatten(self.treedef, _leaf_view(self, flat))

    def _buffers(self, leaves: Sequence[Any]) -> dict[str, jax.Array]:
        out = {}
        for key, members in self.members.items():
            parts = [jnp.ravel(leaves[i]) for i in members]
            out[key] = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return out

    def _leaves(self, flat: dict[str, jax.Array]) -> list[jax.Array]:
        return [
            jax.lax.slice(flat[key], (start,), (start + size,)).reshape(shape)
            for (key, start, size), shape in zip(self.slots, self.shapes, strict=True)
        ]

    def buffer_flags(self, flags: Any) -> dict[str, bool]:
        """A per-leaf flag tree (a bool, or an all-True / all-False array, per leaf) as one bool
        per buffer, e.g. ``adamw``'s weight-decay mask.

        Raises ``ValueError`` when a buffer mixes True and False leaves: give the tree to
        :func:`flat_layout`'s ``split_by``.
        """
        values = [
            _flag(n, f)
            for n, f in zip(paths.leaf_names(flags), jax.tree.leaves(flags), strict=True)
        ]
        self._check_count(len(values), "flag tree")
        out = {}
        for key, members in self.members.items():
            mixed = {values[i] for i in members}
            if len(mixed) != 1:
                raise ValueError(
                    f"buffer {key!r} mixes leaves flagged True and False (e.g. "
                    f"'{self.names[members[0]]}'); pass this flag tree in flat_layout's split_by"
                )
            out[key] = mixed.pop()
        return out

    def flat_mask(self, mask: Any) -> dict[str, np.ndarray]:
        """An elementwise boolean mask like the params, as one host bool buffer per key."""
        leaves = self._checked_leaves(mask)
        return {
            key: np.concatenate([np.asarray(leaves[i], bool).reshape(-1) for i in members])
            for key, members in self.members.items()
        }

    def _check_count(self, count: int, what: str) -> None:
        if count != len(self.shapes):
            raise ValueError(f"{what} has {count} leaves but the params have {len(self.shapes)}")

    def _checked_leaves(self, tree: Any) -> list[Any]:
        leaves = jax.tree.leaves(tree)
        self._check_count(len(leaves), "tree")
        for leaf, name, shape in zip(leaves, self.names, self.shapes, strict=True):
            if leaf_shape(leaf) != shape:
                raise ValueError(
                    f"leaf '{name}' has shape {leaf_shape(leaf)} but the layout's is {shape}"
                )
        return leaves


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _leaf_view(layout: FlatLayout, flat: dict[str, jax.Array]) -> list[jax.Array]:
    return layout._leaves(flat)


def _leaf_view_fwd(layout: FlatLayout, flat: dict[str, jax.Array]) -> tuple[list, None]:
    return layout._leaves(flat), None


def _leaf_view_bwd(layout: FlatLayout, residual: None, leaf_cotangents: list) -> tuple[dict]:
    del residual
    return (layout._buffers(leaf_cotangents),)


_leaf_view.defvjp(_leaf_view_fwd, _leaf_view_bwd)


def flat_layout(params: Any, split_by: Sequence[Any] = ()) -> FlatLayout:
    """The :class:`FlatLayout` of ``params`` (arrays or ``jax.ShapeDtypeStruct`` s): one buffer
    per dtype and combination of the ``split_by`` per-leaf flag trees (e.g. the weight-decay
    mask, the regularisers' anchor mask)."""
    return FlatLayout(params, split_by)


def flat_update(
    layout: FlatLayout, inner: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``inner`` run on ``layout``'s flat buffers: params, updates and ``inner``'s state are
    ``{buffer key: 1-D array}``; the updates come back in the structure they came in.

    Like ``optax.flatten`` (one buffer), with the buffers split by dtype and flags so that masks
    travel (:meth:`FlatLayout.buffer_flags`, :func:`flat_child_tuning_d`). Elementwise transforms
    give the per-leaf results exactly; global reductions (``clip_by_global_norm``) sum in another
    order, within float rounding.
    """

    def init_fn(params: Any) -> Any:
        return inner.init(layout.flatten(params))

    def update_fn(updates: Any, state: Any, params: Any = None) -> Any:
        flat_params = None if params is None else layout.flatten(params)
        flat_updates, state = inner.update(layout.flatten(updates), state, flat_params)
        return layout.unflatten(flat_updates, like=updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def in_leaf_view(
    layout: FlatLayout, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """A per-leaf transform inside :func:`flat_update`: it sees (and its state holds) trees like
    the params. Exact, at the cost of a copy of the updates each way."""

    def init_fn(flat_params: Any) -> Any:
        return tx.init(layout.unflatten(flat_params))

    def update_fn(flat_updates: Any, state: Any, flat_params: Any = None) -> Any:
        params = None if flat_params is None else layout.unflatten(flat_params)
        updates, state = tx.update(layout.unflatten(flat_updates), state, params)
        return layout.flatten(updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def flat_child_tuning_f(
    layout: FlatLayout, reserve_p: float, key: jax.Array, *, sampler: Sampler = "hash"
) -> optax.GradientTransformation:
    """:func:`~childtuning_jax.child_tuning_f` in ``layout``'s flat view, with the same state and
    the same keep decisions element for element (each leaf's, drawn as the per-leaf transform
    draws them and laid out as its buffer), so it can replace it inside :func:`flat_update`."""
    reserve_p = check_reserve_p(reserve_p)
    impl, key_data = split_key(key, sampler)
    scale = keep_scale(reserve_p, sampler)

    def init_fn(params: Any) -> ChildTuningFState:
        del params
        return ChildTuningFState(key=jnp.array(key_data, copy=True))

    def update_fn(updates, state, params=None):
        del params
        if reserve_p == 1.0:
            return updates, state
        next_key, mask_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
        keep = layout.flatten(keep_masks(mask_key, layout.shapes, reserve_p, sampler))
        masked = {
            k: jnp.where(keep[k], g * jnp.asarray(scale, g.dtype), 0).astype(g.dtype)
            for k, g in updates.items()
        }
        return masked, ChildTuningFState(key=jax.random.key_data(next_key))

    return optax.GradientTransformation(init_fn, update_fn)


def flat_child_tuning_d(layout: FlatLayout, mask: Any) -> optax.GradientTransformation:
    """:func:`~childtuning_jax.child_tuning_d` in ``layout``'s flat view: the same products of the
    gradients with the fixed boolean ``mask`` (a tree like the params).

    The state is a :class:`~childtuning_jax.ChildTuningDState` whose ``mask`` holds each buffer's
    bits packed (in ``layout.keys`` order, each padded to whole bytes; ``uniform`` is one unused
    False), so its layout depends on the params alone; each buffer is masked in one loop.
    """
    flat = layout.flat_mask(mask)
    packed = [pack_mask_bits(flat[key]) for key in layout.keys]
    starts = np.cumsum([0] + [p.size for p in packed])
    packed_host = np.concatenate(packed)
    del flat, packed

    def init_fn(params: Any) -> ChildTuningDState:
        del params
        return ChildTuningDState(
            mask=jnp.array(packed_host, copy=True), uniform=jnp.zeros((1,), bool)
        )

    def update_fn(updates, state, params=None):
        del params
        if np.shape(state.mask) != packed_host.shape or state.mask.dtype != np.uint8:
            raise ValueError(
                f"ChildTuningDState.mask is {state.mask.dtype}{list(np.shape(state.mask))}, but "
                f"this flat layout needs uint8{list(packed_host.shape)}: the state comes from a "
                "different layout"
            )
        masked = {}
        for i, key in enumerate(layout.keys):
            g = updates[key]
            bits = jax.lax.slice(state.mask, (int(starts[i]),), (int(starts[i + 1]),))
            keep = unpack_mask_bits(bits, (layout.sizes[key],))
            masked[key] = jnp.where(keep, g, jnp.zeros((), g.dtype))
        return masked, state

    return optax.GradientTransformation(init_fn, update_fn)
