"""RecAdam: Adam with an annealed quadratic pull towards the pretrained weights.

RecAdam (Chen et al., "Recall and Learn: Fine-tuning Deep Pretrained Language Models with Less
Forgetting", EMNLP 2020; reference code: github.com/Sanyuan-Chen/RecAdam, ``RecAdam.py``)
optimises ``lambda(t) * L_task + (1 - lambda(t)) * gamma / 2 * sum((theta - theta*)**2)``, with
the task gradient going through Adam and the quadratic "recall" term applied directly to the
parameters, and ``lambda(t)`` annealed from 0 towards ``anneal_w``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtuning_jax import paths
from childtuning_jax.leaf_layout import check_like_params
from childtuning_jax.regularizers.tree_masks import (
    MaskOrFn,
    copy_tree,
    is_off,
    resolve_mask,
    select,
)

AnnealFun = Literal["sigmoid", "linear", "constant"]


class RecAdamState(NamedTuple):
    """Step count, Adam's moments (dtype of the params) and the anchor weights (a copy)."""

    count: jax.Array
    mu: Any
    nu: Any
    pretrained: Any


def default_anchor_mask(params: Any) -> Any:
    """True (anchored) for every leaf whose ``/``-joined name does not contain ``classifier``.

    The reference leaves the task head, which is not pretrained, unanchored: its parameters get
    ``anneal_w = 0``, a plain Adam step. Its rule is "the name does not contain the model type";
    for BERT and RoBERTa that is exactly the ``classifier`` leaves. For heads named otherwise
    (XLNet's ``sequence_summary`` and ``logits_proj``) pass ``anchor_mask``.
    """
    return paths.map_with_name(lambda name, _: "classifier" not in name, params)


def anneal_lambda(
    step: jax.Array, anneal_fun: AnnealFun, k: float, t0: float, weight: float
) -> jax.Array:
    """The reference's ``anneal_function`` at 1-based ``step``: the weight of the task loss."""
    if anneal_fun == "sigmoid":
        return weight / (1 + jnp.exp(-k * (step - t0)))
    if anneal_fun == "linear":
        return jnp.minimum(1.0, step / t0) * weight
    return jnp.asarray(weight, jnp.float32)


def recadam(
    learning_rate: float | optax.Schedule,
    pretrained: Any,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    anneal_fun: AnnealFun = "sigmoid",
    anneal_k: float = 0.5,
    anneal_t0: float = 250,
    anneal_w: float = 1.0,
    pretrain_cof: float = 5000.0,
    anchor_mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """RecAdam as an optax transform: the reference optimizer's parameter steps, as updates.

    Step ``t`` (1-based), with ``lr`` the learning rate at step ``t - 1`` (as a PyTorch scheduler
    stepped after ``optimizer.step()``), ``m``, ``v`` Adam's moments and
    ``lambda = anneal_lambda(t)``:

    1. Adam with the task gradient scaled by ``lambda``, eps added before bias correction:
       ``theta' = theta - lr * sqrt(1 - b2**t) / (1 - b1**t) * lambda * m / (sqrt(v) + eps)``;
    2. the recall term, on the already-updated ``theta'``:
       ``theta'' = theta' - lr * (anneal_w - lambda) * pretrain_cof * (theta' - pretrained)``;
    3. decoupled weight decay, on the result of 2: ``theta''' = theta'' - lr * weight_decay *
       theta''`` (the reference applies it after both, to every parameter of a decayed group).

    The update is ``theta''' - theta``, so ``optax.apply_updates`` gives the reference's params.
    Unanchored leaves (``anchor_mask`` False), and every leaf when ``anneal_w <= 0``, take a plain
    Adam step (no ``lambda`` scaling, no recall term) and then the weight decay, as the
    reference's groups with ``anneal_w = 0``.

    ``lambda(t)``: ``"sigmoid"``: ``anneal_w / (1 + exp(-anneal_k * (t - anneal_t0)))``;
    ``"linear"``: ``min(1, t / anneal_t0) * anneal_w``; ``"constant"``: ``anneal_w`` (then the
    recall term vanishes). The moments see the raw gradient, so chain it after a Child-Tuning
    mask: ``optax.chain(child_tuning_d(mask), recadam(...))``; the recall term and the weight decay
    still move masked parameters, as the weight decay of ``hf_adamw`` does.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      pretrained: the anchor weights ``theta*``, a pytree with the structure and leaf shapes of the
        params. ``init`` copies it into the state (so it is checkpointed and replicated with it).
      b1, b2, eps: Adam's coefficients (the reference's defaults; eps = 1e-6).
      weight_decay: decoupled weight decay, applied last.
      anneal_fun, anneal_k, anneal_t0, anneal_w: the schedule of ``lambda(t)`` above.
      pretrain_cof: ``gamma``, the strength of the quadratic recall penalty.
      anchor_mask: which leaves are pulled towards ``pretrained``: a pytree of booleans like the
        params (or a prefix of them; leaves may be bool arrays), or a callable returning one
        given the params; ``True`` anchors every leaf. None (default):
        :func:`default_anchor_mask`, every leaf whose name lacks ``classifier``.
      weight_decay_mask: which leaves decay (e.g. not biases and LayerNorm, as the reference's
        ``no_decay`` groups), in the same forms; None decays every leaf.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``.
    """
    if anneal_fun not in ("sigmoid", "linear", "constant"):
        raise ValueError(
            f"anneal_fun must be 'sigmoid', 'linear' or 'constant', got {anneal_fun!r}"
        )
    if anneal_fun == "linear" and not anneal_t0 > 0:
        raise ValueError(f"anneal_fun='linear' needs anneal_t0 > 0, got {anneal_t0!r}")
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    for name, value in (("weight_decay", weight_decay), ("pretrain_cof", pretrain_cof)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    anchoring = anneal_w > 0.0

    def init_fn(params: Any) -> RecAdamState:
        check_like_params(pretrained, params, "pretrained")
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
        return RecAdamState(
            count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros, pretrained=copy_tree(pretrained)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("recadam needs the params: call update(updates, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        t = count.astype(jnp.float32)
        step_size = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        lam = anneal_lambda(t, anneal_fun, anneal_k, anneal_t0, anneal_w)
        task_step = step_size * lam
        recall = lr * (anneal_w - lam) * pretrain_cof
        if anchoring:
            anchored = resolve_mask(
                default_anchor_mask if anchor_mask is None else anchor_mask, params
            )
        else:
            anchored = jax.tree.map(lambda _: False, params)
        decays = resolve_mask(weight_decay_mask, params)
        if decays is None:
            decays = jax.tree.map(lambda _: True, params)

        def new_param(p, m, v, pre, anchor, decay):
            ratio = m / (jnp.sqrt(v) + eps)
            plain = p - step_size * ratio
            if is_off(anchor):
                theta = plain
            else:
                theta = p - task_step * ratio
                theta = theta - recall * (theta - pre.astype(p.dtype))
                theta = select(anchor, theta, plain)
            if weight_decay > 0.0 and not is_off(decay):
                theta = select(decay, theta - lr * weight_decay * theta, theta)
            return (theta - p).astype(jnp.result_type(p))

        new_updates = jax.tree.map(new_param, params, mu, nu, state.pretrained, anchored, decays)
        return new_updates, RecAdamState(count=count, mu=mu, nu=nu, pretrained=state.pretrained)

    return optax.GradientTransformation(init_fn, update_fn)
