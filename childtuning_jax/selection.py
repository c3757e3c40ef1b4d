"""ChildTuning-D's child network: one global Fisher-information threshold over the encoder layers.

The official code concatenates the Fisher information of every parameter whose name contains
``layer`` into one NumPy array, takes ``polar = np.percentile(all_values, 100 * (1 - reserve_p))``
and keeps every value ``>= polar`` (Xu et al., 2021, Sec. 3.2); all other parameters (embeddings,
pooler, classifier) are always trained. :func:`fisher_mask` returns the same mask, bit for bit,
without the concatenation or a full sort, so it scales to large models.

Algorithm (exact order statistics from a sample and one bracketing pass):

1. The percentile is numpy's ``linear`` method: with ``n`` values and ``h = (n - 1) * q``, it needs
   the order statistics ``a[floor(h)]`` and ``a[floor(h) + 1]`` of the sorted values and
   interpolates between them with the same float operations numpy uses, in the values' dtype.
2. A uniform random sample of the values (``2**18``) brackets those ranks between two sample values
   ``lo <= hi`` placed five standard errors of the sample quantile to either side.
3. One pass over the eligible leaves (in threads; NumPy releases the GIL) writes ``value >= lo``,
   counts the values below ``lo`` and gathers the values inside ``[lo, hi]`` with their positions.
   When the counts prove that both ranks lie inside the bracket, ``np.partition`` of the gathered
   values gives them exactly; otherwise (an unlucky sample, heavy ties) the bracket widens and the
   pass repeats, at worst over the whole range, so the result is always exact.
4. The mask is ``value >= lo`` with the gathered values below the threshold switched off: no
   further full pass. Leaves on an accelerator are copied to host memory first, in one batched
   transfer (these branchy, data-dependent passes run as many small eager ops on an accelerator);
   each mask goes back to its leaf's sharding.

No concatenated copy and no full sort: O(n) time, a few streaming reads of each leaf, and extra
memory of one boolean per value (the mask itself) plus the sample and the bracket.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import paths
from childtuning_jax.task_free import check_reserve_p

Where = Callable[[str], bool]

_SAMPLE_SIZE = 2**18
_BRACKET_SIGMAS = 5.0
_BRACKET_MARGIN = 2.0  # sample ranks added on each side
_CHUNK = 1 << 18  # values per chunk of the host pass: temporaries stay in cache


def official_eligibility(name: str) -> bool:
    """The official rule: a parameter is in the child-network search space iff its name contains
    ``layer`` (case-sensitive: ``bert/encoder/layer/3/...`` is, ``bert/embeddings/LayerNorm`` is
    not)."""
    return "layer" in name


def _host_view(leaf: Any) -> np.ndarray | None:
    """A flat NumPy view of a leaf that lives in host memory (no copy), else None."""
    if isinstance(leaf, np.ndarray):
        return leaf.reshape(-1)
    if isinstance(leaf, jax.Array):
        if all(device.platform == "cpu" for device in leaf.devices()):
            return np.asarray(leaf).reshape(-1)
        return None
    return np.asarray(leaf).reshape(-1)


class _Leaf:
    """One eligible leaf: its values as a flat host array and the passes the selection needs.

    ``value`` is the caller's leaf (its shape and placement are those of the mask); ``host`` is a
    flat NumPy array of the same values (a view for host leaves, a copy for accelerator leaves).
    """

    def __init__(self, name: str, value: Any, host: np.ndarray):
        self.name = name
        self.value = value
        self.host = host
        self.size = host.size
        self._at_least_lo: np.ndarray | None = None  # value >= lo, the mask to be
        self._bracket_positions: np.ndarray | None = None
        self._lo: Any = None

    def bracket(self, lo: Any, hi: Any) -> tuple[int, np.ndarray]:
        """(number of values < lo, the values v with lo <= v <= hi).

        Streams over the leaf in cache-sized chunks, checks that every value is finite, and keeps
        ``value >= lo`` and the positions of the bracketed values, from which :meth:`mask`
        finishes the mask without another full pass.
        """
        x = self.host
        at_least_lo = np.empty(x.size, dtype=bool)
        above_hi = np.empty(min(x.size, _CHUNK), dtype=bool)
        below = 0
        positions, values = [], []
        for start in range(0, x.size, _CHUNK):
            chunk = x[start : start + _CHUNK]
            with np.errstate(over="ignore", invalid="ignore"):
                if not math.isfinite(float(np.add.reduce(chunk))):  # NaN/inf propagate
                    if not np.isfinite(chunk).all():  # not just an overflowing sum
                        raise ValueError(
                            f"Fisher information of '{self.name}' has non-finite values "
                            "(NaN or inf)"
                        )
            ge = np.greater_equal(chunk, lo, out=at_least_lo[start : start + _CHUNK])
            below += chunk.size - int(np.count_nonzero(ge))
            gt = np.greater(chunk, hi, out=above_hi[: chunk.size])
            inside = np.logical_xor(ge, gt, out=gt)  # lo <= v <= hi, as v > hi implies v >= lo
            found = np.flatnonzero(inside)
            if found.size:
                positions.append(found + start)
                values.append(chunk[found])
        self._at_least_lo = at_least_lo
        self._bracket_positions = np.concatenate(positions) if positions else np.empty(0, np.intp)
        self._lo = lo
        return below, (np.concatenate(values) if values else np.empty(0, x.dtype))

    def mask(self, threshold: Any) -> jax.Array:
        """``value >= threshold`` as a bool array shaped and placed like the caller's leaf."""
        if self._lo is not None and self._lo <= threshold:
            # value >= lo is already known; only bracketed values can fall in [lo, threshold).
            keep = self._at_least_lo
            positions = self._bracket_positions
            keep[positions[self.host[positions] < threshold]] = False
        else:
            keep = np.greater_equal(self.host, threshold)
        self._at_least_lo = self._bracket_positions = self._lo = None
        keep = keep.reshape(np.shape(self.value))
        if isinstance(self.value, jax.Array):
            return jax.device_put(keep, self.value.sharding)
        return jnp.asarray(keep)


def _parallel_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # NumPy releases the GIL
        return list(pool.map(fn, items))


def _sample(leaves: list[_Leaf], total: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted uniform sample (with replacement) of all eligible values."""
    count = min(_SAMPLE_SIZE, total)
    global_positions = np.sort(rng.integers(0, total, size=count))
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
    owner = np.searchsorted(offsets, global_positions, side="right") - 1
    parts = []
    for i, leaf in enumerate(leaves):
        local = global_positions[owner == i] - offsets[i]
        if local.size:
            parts.append(leaf.host[local])
    return np.sort(np.concatenate(parts))


def _order_statistics(
    leaves: list[_Leaf], total: int, ranks: tuple[int, int]
) -> tuple[np.generic, np.generic]:
    """The values of rank ``ranks[0] <= ranks[1]`` (0-based) among all eligible values."""
    first, last = ranks
    sample = _sample(leaves, total, np.random.default_rng(0))
    m = sample.size
    center = (first + last) / 2 / max(total - 1, 1) * (m - 1)
    spread = _BRACKET_SIGMAS * math.sqrt(max(m * (center / m) * (1 - center / m), 1.0))
    spread += _BRACKET_MARGIN
    while True:
        lo_index = math.floor(center - spread)
        hi_index = math.ceil(center + spread)
        lo = sample[lo_index] if lo_index >= 0 else -np.inf
        hi = sample[hi_index] if hi_index < m else np.inf
        results = _parallel_map(lambda leaf, lo=lo, hi=hi: leaf.bracket(lo, hi), leaves)
        below = sum(count for count, _ in results)
        inside = np.concatenate([values for _, values in results])
        if below <= first and last < below + inside.size:
            picks = [first - below, last - below]
            inside = np.partition(inside, picks) if inside.size > 1 else inside
            return inside[picks[0]], inside[picks[1]]
        if lo_index < 0 and hi_index >= m:  # the whole range: cannot miss
            raise AssertionError("order statistics outside the full range")
        spread = max(4 * spread, 1.0)  # unlucky sample or heavy ties: widen and pass again


def percentile_threshold(fisher: Any, reserve_p: float, *, where: Where | None = None) -> Any:
    """``numpy.percentile(eligible_values, 100 * (1 - reserve_p))``, computed without concatenating.

    The same number the official code gets (numpy's default ``linear`` method; same float
    operations), as a NumPy scalar of the eligible values' dtype.
    """
    reserve_p = check_reserve_p(reserve_p)
    leaves = _eligible_leaves(fisher, where)
    return _threshold(leaves, reserve_p)


def _eligible_leaves(fisher: Any, where: Where | None) -> list[_Leaf]:
    where = official_eligibility if where is None else where
    if not callable(where):
        raise TypeError(f"where must be a callable on leaf names, got {where!r}")
    named = jax.tree_util.tree_flatten_with_path(fisher)[0]
    if not named:
        raise ValueError("the Fisher pytree has no leaves")
    eligible = []
    for path, value in named:
        name = paths.keypath_to_str(path)
        if not where(name):
            continue
        dtype = np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
        if not np.issubdtype(dtype, np.floating) and dtype != jnp.bfloat16:
            raise TypeError(f"Fisher leaf '{name}' must be floating point, got dtype {dtype}")
        if np.size(value):
            eligible.append((name, value))
    if not eligible:
        example = paths.keypath_to_str(named[0][0])
        raise ValueError(
            f"no eligible (non-empty) Fisher leaf: `where` selected none of the {len(named)} "
            f"leaves (e.g. '{example}')"
        )
    hosts = [_host_view(value) for _, value in eligible]
    on_device = [i for i, host in enumerate(hosts) if host is None]
    # Accelerator leaves come to host memory in one batched transfer: the passes below are
    # branchy, data-dependent streaming that a device runs as many small eager ops.
    copies = jax.device_get([eligible[i][1] for i in on_device])
    for i, copy in zip(on_device, copies, strict=True):
        hosts[i] = np.asarray(copy).reshape(-1)
    return [_Leaf(name, value, host) for (name, value), host in zip(eligible, hosts, strict=True)]


def _threshold(leaves: list[_Leaf], reserve_p: float) -> Any:
    total = sum(leaf.size for leaf in leaves)
    dtype = np.result_type(*[leaf.host.dtype for leaf in leaves])
    # numpy.percentile(a, q) with q a Python float: q / 100 in float64, virtual index (n - 1) * q.
    quantile = np.true_divide(np.asarray((1 - reserve_p) * 100), 100)
    virtual = (total - 1) * quantile
    if virtual >= total - 1:
        below = above = total - 1
    else:
        below = int(np.floor(virtual))
        above = below + 1
    low, high = _order_statistics(leaves, total, (below, above))
    low, high = dtype.type(low), dtype.type(high)
    gamma = float(virtual - np.floor(virtual)) if above != below else 0.0
    # numpy's _lerp with a weak (Python float) weight, in the values' dtype.
    diff = high - low
    if gamma >= 0.5:
        return dtype.type(high - diff * (1 - gamma))
    return dtype.type(low + diff * gamma)


def fisher_mask(fisher: Any, reserve_p: float, *, where: Where | None = None) -> Any:
    """The ChildTuning-D mask: the top-``reserve_p`` eligible parameters by Fisher information.

    One global threshold ``numpy.percentile(all_eligible_values, 100 * (1 - reserve_p))``
    (numpy's default linear interpolation) over every eligible value; an eligible value is kept
    when it is ``>=`` the threshold, so ties at the threshold are all kept, as in the official code.
    Leaves that are not eligible are all True: they are always trained (Xu et al., 2021, Sec. 3.2).

    Args:
      fisher: a pytree of Fisher information (e.g. from :func:`fisher_information`), any float
        dtype, on host or device; dicts, ``FrozenDict`` s and NNX ``State`` s (with or without
        ``Variable`` wrappers) are named alike, by :mod:`childtuning_jax.paths`.
      reserve_p: the fraction of eligible parameters to keep, in (0, 1].
      where: ``where(name) -> bool`` on each leaf's ``/``-joined key path (e.g.
        ``bert/encoder/layer/3/attention/self/query/kernel``). Default: :func:`official_eligibility`
        (the name contains ``layer``).

    Returns:
      A pytree of boolean arrays with the structure of ``fisher``; :func:`child_tuning_d` matches
      it to the params by leaf name, so it need not share their pytree type.

    Raises:
      ValueError: reserve_p outside (0, 1]; ``where`` selects no leaf; a non-finite Fisher value
        (names the leaf).
    """
    reserve_p = check_reserve_p(reserve_p)
    leaves = _eligible_leaves(fisher, where)
    threshold = _threshold(leaves, reserve_p)
    leaf_masks = _parallel_map(lambda leaf: leaf.mask(threshold), leaves)
    masks = {leaf.name: mask for leaf, mask in zip(leaves, leaf_masks, strict=True)}

    def build(name: str, value: Any) -> jax.Array:
        if name in masks:
            return masks[name]
        return jnp.ones(np.shape(value), dtype=bool)

    return paths.map_with_name(build, fisher)
