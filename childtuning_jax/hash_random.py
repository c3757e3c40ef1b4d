"""Counter-based random bits from a 32-bit integer hash: Bernoulli masks that fuse into the
elementwise work that consumes them.

``jax.random.bernoulli`` runs threefry per element, many rounds of integer work for each random
word; for a mask over every parameter (ChildTuning-F) or every activation (dropout) that costs more
than the elementwise update it feeds. Here each element's word is one hash of its index,
``lowbias32(index * (seed[1] | 1) + seed[0])``, with a per-call ``seed`` drawn by threefry, and it
fuses into the consuming elementwise kernel.

For a uniformly random ``seed[0]`` every element's word is exactly uniform over 2**32 values (the
affine map and the hash are bijections of the index), so ``word < t`` holds with probability
exactly ``t / 2**32``. The random odd multiplier and the hash's avalanche decorrelate neighbouring
elements and successive calls.

``index_shape`` (at least ``shape`` along every axis) hashes each element by its flat index in
``index_shape`` instead: the word of an element then depends on its position alone, not on how far
the tensor extends along an axis (a dropout mask on a padded batch equals the unpadded one on the
original positions). The index is a sum of per-axis iotas times fixed strides, still one hash per
element, fused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

UINT32_RANGE = 2**32


def mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with full avalanche (Wellons' ``lowbias32``)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def flat_index(shape: tuple[int, ...], index_shape: tuple[int, ...] | None = None) -> jax.Array:
    """The uint32 flat index in ``index_shape`` (default ``shape``) of each element of ``shape``.

    Raises ``ValueError`` when ``index_shape`` is smaller than ``shape`` along an axis, or has 2**32
    elements or more (the index would wrap and repeat words).
    """
    index_shape = tuple(shape if index_shape is None else index_shape)
    if len(index_shape) != len(shape) or any(
        n > m for n, m in zip(shape, index_shape, strict=True)
    ):
        raise ValueError(f"index_shape {index_shape} must be at least {shape} on every axis")
    size = math.prod(index_shape)
    if size >= UINT32_RANGE:
        raise ValueError(
            f"{size} elements is too many for the 32-bit hash (at most 2**32 - 1); "
            "use jax.random.bernoulli (ChildTuning-F: sampler='jax')"
        )
    if index_shape == shape:
        return jax.lax.iota(jnp.uint32, size).reshape(shape)
    strides = [math.prod(index_shape[axis + 1 :]) for axis in range(len(shape))]
    index = jnp.zeros(shape, jnp.uint32)
    for axis, stride in enumerate(strides):
        if shape[axis] > 1:
            index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    return index


def uniform_bits(
    shape: tuple[int, ...], seed: jax.Array, index_shape: tuple[int, ...] | None = None
) -> jax.Array:
    """32 uniform random bits per element of ``shape`` from a ``uint32[2]`` ``seed``, hashed by
    each element's flat index in ``index_shape`` (default ``shape``; :func:`flat_index`)."""
    index = flat_index(tuple(shape), index_shape)
    return mix32(index * (seed[1] | jnp.uint32(1)) + seed[0])


def keep_threshold(p: float) -> int:
    """The uint32 threshold ``t`` whose probability ``t / 2**32`` is closest to ``p`` in (0, 1)."""
    return min(max(round(p * UINT32_RANGE), 1), UINT32_RANGE - 1)


def bernoulli(
    key: jax.Array, p: float, shape: tuple[int, ...], index_shape: tuple[int, ...] | None = None
) -> jax.Array:
    """A boolean mask, True with probability ``keep_threshold(p) / 2**32`` (within 2**-32 of
    ``p``), like ``jax.random.bernoulli(key, p, shape)`` but one hash per element; ``p`` is a
    Python float in (0, 1). ``index_shape``: as in :func:`uniform_bits`."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    return uniform_bits(shape, seed, index_shape) < jnp.uint32(keep_threshold(p))
