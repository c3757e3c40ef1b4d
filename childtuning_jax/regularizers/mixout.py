"""Mixout: stochastically mix fine-tuned Linear weights with their pretrained values.

Mixout (Lee et al., "Mixout: Effective Regularization to Finetune Large-scale Pretrained Language
Models", ICLR 2020; reference code: github.com/bloodwass/mixout, ``mixout.py``) replaces dropout
on a Linear layer's input by swapping, with probability ``p``, the weights of each input feature
for their pretrained values, rescaled so the mixed weight's expectation is the fine-tuned one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from childtuning_jax import paths

Where = Callable[[str], bool]


def linear_kernels(name: str) -> bool:
    """The default selection: leaves whose ``/``-joined name ends with ``kernel``.

    In this library's Flax models those are exactly the ``nnx.Linear`` kernels (BERT/RoBERTa
    ``.../query/kernel``, ``.../dense/kernel``, the pooler and classifier). Embeddings
    (``.../embedding``), biases and LayerNorm ``scale``/``bias`` do not match. Weights that are
    not Linear layers, such as XLNet's 3-D relative-attention ``q``/``k``/``v``/``o``/``r``
    parameters (plain ``nn.Parameter`` in Hugging Face, untouched by the reference, which swaps
    ``nn.Linear`` modules), do not match either.
    """
    return name.endswith("kernel")


def _mix(w: jax.Array, target: jax.Array, keep: jax.Array, p: float) -> jax.Array:
    return ((1 - keep) * target + keep * w - p * target) / (1 - p)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mix_reference_backward(
    w: jax.Array, target: jax.Array, keep: jax.Array, p: float
) -> jax.Array:
    return _mix(w, target, keep, p)


def _mix_fwd(w, target, keep, p):
    return _mix(w, target, keep, p), (keep, target)


def _mix_bwd(p, residuals, g):
    keep, target = residuals
    # The reference's backward: grad * mask, without the forward's 1 / (1 - p).
    return (g * keep).astype(g.dtype), jnp.zeros_like(target), jnp.zeros_like(keep)


_mix_reference_backward.defvjp(_mix_fwd, _mix_bwd)


def _check_p(p: float) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"mixout probability p must be a number in [0, 1), got {p!r}") from None
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"mixout probability p must be in [0, 1), got {p!r}")
    return value


def mixout(
    params: Any,
    pretrained: Any,
    p: float,
    key: jax.Array,
    *,
    where: Where | None = None,
    reference_backward: bool = False,
) -> Any:
    """The params that a training forward pass uses under mixout.

    For each selected weight ``w`` with pretrained value ``w_pre`` it returns
    ``((1 - M) * w_pre + M * w - p * w_pre) / (1 - p)`` with ``M ~ Bernoulli(1 - p)``, so
    ``E[result] = w`` (Lee et al., ICLR 2020). As in the reference, one mask value is drawn per
    input feature of a Linear weight and shared by all its outputs: a Flax kernel is
    ``(in, out)``, so ``M`` has shape ``(in, 1)`` (the reference's torch weight is ``(out, in)``
    with one value per column). A selected 1-D leaf gets one value per element (the reference's
    1-D case). Every other leaf (biases, LayerNorm, embeddings by default) is returned as is, and
    ``pretrained`` gets no gradient. Each call draws new masks; use a fresh ``key`` per step.

    Call it only in training, inside the loss, and run the model on the result; evaluate with the
    params unchanged. The reference sets the model's dropout to 0 where mixout is used (mixout
    replaces the dropout before each mixed Linear layer); do the same in the model config.

    Gradient: with ``reference_backward=False`` (default) the gradient is the exact derivative of
    the forward above, ``grad * M / (1 - p)``, consistent with the function the forward pass uses
    (and with inverted dropout's backward). The reference's backward returns ``grad * M``, without
    the ``1 / (1 - p)``; ``reference_backward=True`` reproduces it (a ``jax.custom_vjp``). The two
    differ by a constant factor on mixed leaves only, which matters under global-norm clipping and
    SGD, hardly under Adam.

    Args:
      params: the fine-tuned params (a pytree, e.g. an NNX ``State``).
      pretrained: the weights to mix in, with the structure and shapes of ``params`` (e.g. the
        params at the start of fine-tuning).
      p: the mix probability, in [0, 1). ``p == 0`` returns ``params`` itself.
      key: a JAX PRNG key (typed or legacy); leaf masks come from ``jax.random.split(key, n)``.
      where: ``where(name) -> bool`` on each leaf's ``/``-joined name, selecting the leaves to mix.
        Default: :func:`linear_kernels` (names ending with ``kernel``). Selected leaves must be
        2-D ``(in, out)`` kernels or 1-D.
      reference_backward: use the reference's gradient ``grad * M`` (see above).

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: ``p`` outside [0, 1); ``where`` selects no leaf; a selected leaf is neither 1-D
        nor 2-D; ``pretrained`` differs from ``params`` in structure or shape (names the leaf).
    """
    p = _check_p(p)
    if p == 0.0:
        return params
    where = linear_kernels if where is None else where
    if not callable(where):
        raise TypeError(f"where must be a callable on leaf names, got {where!r}")
    named, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [paths.keypath_to_str(path) for path, _ in named]
    try:
        targets = treedef.flatten_up_to(pretrained)
    except (ValueError, TypeError) as error:
        raise ValueError(f"pretrained and params differ in structure: {error}") from None
    selected = [i for i, name in enumerate(names) if where(name)]
    if not selected:
        example = names[0] if names else "(no leaves)"
        raise ValueError(
            f"mixout: `where` selected none of the {len(names)} leaves (e.g. '{example}')"
        )
    leaves = [leaf for _, leaf in named]
    keys = jax.random.split(key, len(selected))
    mix = _mix_reference_backward if reference_backward else _mix
    for i, leaf_key in zip(selected, keys, strict=True):
        w, target, name = leaves[i], targets[i], names[i]
        if jnp.shape(target) != jnp.shape(w):
            raise ValueError(
                f"pretrained leaf '{name}' has shape {jnp.shape(target)} but the params leaf has "
                f"shape {jnp.shape(w)}"
            )
        if w.ndim == 2:
            mask_shape = (w.shape[0], 1)  # one value per input feature, shared by the outputs
        elif w.ndim == 1:
            mask_shape = w.shape
        else:
            raise ValueError(
                f"mixout mixes 2-D (in, out) Linear kernels or 1-D leaves; '{name}' has shape "
                f"{w.shape} (pass `where` to leave it out)"
            )
        keep = jax.random.bernoulli(leaf_key, 1.0 - p, mask_shape).astype(w.dtype)
        target = jax.lax.stop_gradient(jnp.asarray(target, w.dtype))
        leaves[i] = mix(w, target, keep, p)
    return jax.tree.unflatten(treedef, leaves)
