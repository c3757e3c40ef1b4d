"""R3F: a symmetric-KL penalty between clean and noise-perturbed forward passes.

R3F (Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse", ICLR 2021;
reference code: fairseq ``examples/rxf``, ``sentence_prediction_r3f.py``) adds small noise to the
token embeddings, runs the model a second time and penalises the symmetric KL divergence between
the two output distributions, keeping the fine-tuned function smooth around the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

NoiseType = Literal["uniform", "normal"]
Perturb = Callable[[jax.Array], jax.Array]
ApplyFn = Callable[[Any, Any, jax.Array, Perturb | None], jax.Array]
ExampleLossFn = Callable[[jax.Array, Any], jax.Array]


def _check_noise(eps: float, noise_type: str) -> float:
    if noise_type not in ("uniform", "normal"):
        raise ValueError(f"noise_type must be 'uniform' or 'normal', got {noise_type!r}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return eps


def r3f_noise(
    key: jax.Array,
    shape: Sequence[int],
    eps: float = 1e-5,
    noise_type: NoiseType = "uniform",
    dtype: Any = jnp.float32,
) -> jax.Array:
    """R3F's embedding noise: ``Uniform(-eps, eps)`` or ``Normal(0, eps)`` (``eps`` the standard
    deviation), as fairseq's ``--noise-type`` and ``--eps`` (default 1e-5)."""
    eps = _check_noise(eps, noise_type)
    if noise_type == "uniform":
        return jax.random.uniform(key, tuple(shape), jnp.float32, -eps, eps).astype(dtype)
    return (eps * jax.random.normal(key, tuple(shape), jnp.float32)).astype(dtype)


def symmetric_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """``KL(p || q) + KL(q || p)`` per example, with ``p = softmax(logits_p)`` and
    ``q = softmax(logits_q)`` over the last axis.

    As fairseq's ``_get_symm_kl``: log-softmax in float32, summed over the classes. fairseq then
    sums over the batch and divides by the batch size; that reduction is left to the caller.
    Returns float32 of shape ``logits_p.shape[:-1]``.
    """
    log_p = jax.nn.log_softmax(jnp.asarray(logits_p, jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(jnp.asarray(logits_q, jnp.float32), axis=-1)
    return jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1)


def r3f_loss(
    apply_fn: ApplyFn,
    example_loss_fn: ExampleLossFn,
    *,
    eps: float = 1e-5,
    lambda_: float = 1.0,
    noise_type: NoiseType = "uniform",
    regression: bool = False,
    detach_noisy_embeddings: bool = True,
) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """Wraps a model and a per-example task loss into R3F's per-example training loss.

    ``per_example_losses(params, batch, rng)`` runs two forward passes,

    * clean: ``apply_fn(params, batch, clean_key, None)``,
    * noisy: ``apply_fn(params, batch, noisy_key, perturb)`` where ``perturb(e)`` returns
      ``e + noise`` for the word-embedding lookup output ``e`` (``noise = r3f_noise(noise_key,
      e.shape, eps, noise_type)`` in ``e``'s dtype),

    and returns ``example_loss_fn(clean_logits, batch) + lambda_ * symmetric_kl(clean_logits,
    noisy_logits)``, one value per example; reduce it (e.g. ``mean``) yourself. Gradients flow
    through both passes. With ``detach_noisy_embeddings`` (default, as fairseq's
    ``token_embeddings.detach() + noise``), the noisy pass sends no gradient into the embedding
    table through ``e``; every other parameter gets gradients from both passes.

    ``rng`` is split into three keys: ``clean_key`` and ``noisy_key`` are the two passes' own
    dropout keys (fairseq runs two independent training forward passes) and ``noise_key`` draws
    the noise. It is required even without dropout, since the noise needs a key.

    ``regression=True`` (one output, e.g. STS-B): the penalty is the squared difference of the two
    outputs, summed over the last axis, as the softmax of a single logit is constant. (fairseq
    computes the noisy pass for regression but adds no penalty: there R3F is plain MSE.)

    Evaluate without this wrapper: a single clean pass with the task loss.

    Args:
      apply_fn: ``apply_fn(params, batch, rng, perturb_embeddings) -> logits`` of shape
        ``(batch, classes)``; ``perturb_embeddings`` is None (no perturbation) or a callable the
        model applies to its word-embedding lookup output before adding positions and the
        LayerNorm.
      example_loss_fn: ``example_loss_fn(logits, batch) -> (batch,)`` per-example task losses.
      eps: the noise scale (see :func:`r3f_noise`).
      lambda_: the weight of the penalty (fairseq's ``--r3f-lambda``).
      noise_type: ``"uniform"`` or ``"normal"``.
      regression: use the squared-difference penalty above.
      detach_noisy_embeddings: stop the gradient into the embedding lookup of the noisy pass.

    Returns:
      ``per_example_losses(params, batch, rng) -> (batch,)`` float32 array.
    """
    eps = _check_noise(eps, noise_type)
    lambda_ = float(lambda_)
    if not math.isfinite(lambda_):
        raise ValueError(f"lambda_ must be finite, got {lambda_!r}")

    def per_example_losses(params: Any, batch: Any, rng: jax.Array | None) -> jax.Array:
        if rng is None:
            raise ValueError(
                "r3f_loss needs an rng key: it draws the embedding noise (and the two passes' "
                "dropout keys) from it"
            )
        clean_key, noisy_key, noise_key = jax.random.split(rng, 3)

        def perturb(embeddings: jax.Array) -> jax.Array:
            base = jax.lax.stop_gradient(embeddings) if detach_noisy_embeddings else embeddings
            noise = r3f_noise(noise_key, embeddings.shape, eps, noise_type, embeddings.dtype)
            return base + noise

        clean = apply_fn(params, batch, clean_key, None)
        noisy = apply_fn(params, batch, noisy_key, perturb)
        task = jnp.asarray(example_loss_fn(clean, batch), jnp.float32)
        if regression:
            diff = jnp.asarray(noisy, jnp.float32) - jnp.asarray(clean, jnp.float32)
            penalty = jnp.sum(jnp.square(diff), axis=-1)
        else:
            penalty = symmetric_kl(clean, noisy)
        return task + lambda_ * penalty

    return per_example_losses
