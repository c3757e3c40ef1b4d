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


def uniform_bits(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    """32 uniform random bits per element of ``shape`` from a ``uint32[2]`` ``seed``.

    Raises ``ValueError`` for 2**32 elements or more (the index would wrap and repeat words).
    """
    size = math.prod(shape)
    if size >= UINT32_RANGE:
        raise ValueError(
            f"{size} elements is too many for the 32-bit hash (at most 2**32 - 1); "
            "use jax.random.bernoulli (ChildTuning-F: sampler='jax')"
        )
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return mix32(index * (seed[1] | jnp.uint32(1)) + seed[0])


def keep_threshold(p: float) -> int:
    """The uint32 threshold ``t`` whose probability ``t / 2**32`` is closest to ``p`` in (0, 1)."""
    return min(max(round(p * UINT32_RANGE), 1), UINT32_RANGE - 1)


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """A boolean mask, True with probability ``keep_threshold(p) / 2**32`` (within 2**-32 of
    ``p``), like ``jax.random.bernoulli(key, p, shape)`` but one hash per element; ``p`` is a
    Python float in (0, 1)."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    return uniform_bits(shape, seed) < jnp.uint32(keep_threshold(p))
