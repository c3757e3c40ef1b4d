"""Fisher information of the parameters, the score ChildTuning-D selects its child network by.

Xu et al. (2021, Eq. 4) estimate the Fisher information of each parameter from the training data as
the mean squared gradient of the loss. Two estimators are offered:

* the official code's rule (default): for each batch, the gradient of the batch-mean loss,
  optionally clipped per parameter tensor (``torch.nn.utils.clip_grad_norm_`` applied to that one
  tensor), squared and summed; the sum divided by the number of batches (a partial last batch
  counts as one batch).
* ``per_example=True``: the paper's definition, the mean over examples of squared per-example
  gradients (vmapped over examples in chunks so memory stays bounded).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import parallel, paths

LossFn = Callable[..., jax.Array]

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon


def clip_leaf_norm(grad: jax.Array, max_norm: float) -> jax.Array:
    """Scales one tensor like ``clip_grad_norm_(tensor, max_norm)``: min(1, max / (norm + 1e-6))."""
    norm = jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32))))
    coef = jnp.minimum(max_norm / (norm + _CLIP_EPS), 1.0)
    return (grad.astype(jnp.float32) * coef).astype(grad.dtype)


def _squared(grads: Any, max_grad_norm: float | None) -> Any:
    def square(grad: jax.Array) -> jax.Array:
        if max_grad_norm is not None:
            grad = clip_leaf_norm(grad, max_grad_norm)
        return jnp.square(grad.astype(jnp.float32))

    return jax.tree.map(square, grads)


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("a batch has no arrays")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"batch leaves must share one leading (example) axis, got sizes {sizes}")
    return sizes.pop()


def _takes_rng(loss_fn: LossFn) -> bool:
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def _make_grad_sq_sum(
    loss_fn: LossFn,
    *,
    max_grad_norm: float | None,
    per_example: bool,
    chunk_size: int,
    axis_name: str | None,
    has_rng: bool,
) -> Callable[[Any, Any, Any], Any]:
    """Builds ``f(params, batch, rng) -> pytree``: this batch's contribution to the Fisher sum.

    Default rule: the squared (clipped) gradient of the batch-mean loss; under ``axis_name`` the
    per-device gradients are averaged first, so the result equals the single-device one.
    Per-example rule: the sum of squared per-example gradients (summed over devices too).
    """
    grad_fn = jax.grad(loss_fn)

    def batch_mean_rule(params, batch, rng):
        grads = grad_fn(params, batch) if rng is None else grad_fn(params, batch, rng)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        return _squared(grads, max_grad_norm)

    def example_sq(params, example, rng):
        single = jax.tree.map(lambda x: x[None], example)
        grads = grad_fn(params, single) if rng is None else grad_fn(params, single, rng)
        return _squared(grads, max_grad_norm)

    def per_example_rule(params, batch, rng):
        n = _batch_size(batch)
        if rng is not None:
            if axis_name is not None:
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
            example_rngs = jax.random.split(rng, n)
        else:
            example_rngs = None

        def chunk_sum(chunk, chunk_rngs):
            sq = jax.vmap(example_sq, in_axes=(None, 0, None if chunk_rngs is None else 0))(
                params, chunk, chunk_rngs
            )
            return jax.tree.map(lambda x: jnp.sum(x, axis=0), sq)

        full, rest = divmod(n, chunk_size)
        total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if full:
            chunks = jax.tree.map(
                lambda x: x[: full * chunk_size].reshape(full, chunk_size, *x.shape[1:]), batch
            )
            chunk_rngs = (
                None
                if example_rngs is None
                else example_rngs[: full * chunk_size].reshape(full, chunk_size, -1)
            )

            def body(acc, xs):
                chunk, rngs = xs
                return _tree_add(acc, chunk_sum(chunk, rngs)), None

            total, _ = jax.lax.scan(body, total, (chunks, chunk_rngs))
        if rest:
            tail = jax.tree.map(lambda x: x[full * chunk_size :], batch)
            tail_rngs = None if example_rngs is None else example_rngs[full * chunk_size :]
            total = _tree_add(total, chunk_sum(tail, tail_rngs))
        if axis_name is not None:
            total = jax.lax.psum(total, axis_name)
        return total

    rule = per_example_rule if per_example else batch_mean_rule

    def keyed_rule(params, batch, rng):
        if not has_rng:
            return rule(params, batch, None)
        if axis_name is not None and not per_example:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        return rule(params, batch, rng)

    return keyed_rule


@functools.lru_cache(maxsize=32)
def _compiled_steps(
    loss_fn: LossFn, options: tuple[tuple[str, Any], ...], devices: tuple[jax.Device, ...] | None
) -> Callable[..., Any]:
    """The jitted (or pmapped) accumulation step, cached so repeated passes with the same
    ``loss_fn`` and options reuse their compilation."""
    if devices is None:
        rule = _make_grad_sq_sum(loss_fn, axis_name=None, **dict(options))
        return jax.jit(
            lambda acc, params, batch, rng: _tree_add(acc, rule(params, batch, rng)),
            donate_argnums=0,
        )
    pmap_rule = _make_grad_sq_sum(loss_fn, axis_name="batch", **dict(options))
    return jax.pmap(
        lambda acc, params, batch, rng: _tree_add(acc, pmap_rule(params, batch, rng)),
        axis_name="batch",
        in_axes=(0, 0, 0, None),
        devices=devices,
        donate_argnums=0,
    )


def _check_finite(fisher: Any) -> None:
    finite = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), fisher)
    for name, ok in zip(paths.leaf_names(finite), jax.tree.leaves(finite), strict=True):
        if not bool(ok):
            raise FloatingPointError(
                f"Fisher information of '{name}' is not finite (NaN or inf gradients); "
                "check the loss and the inputs"
            )


def fisher_information(
    loss_fn: LossFn,
    params: Any,
    batches: Iterable[Any],
    *,
    max_grad_norm: float | None = None,
    per_example: bool = False,
    rng: jax.Array | None = None,
    devices: Sequence[jax.Device] | None = None,
    chunk_size: int = 8,
) -> Any:
    """Estimates the Fisher information of every parameter (Xu et al., 2021, Eq. 4).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch, or
        ``loss_fn(params, batch, rng)`` when ``rng`` is given (e.g. dropout, as during training).
      params: the parameter pytree, any structure: nested dicts, a Linen ``FrozenDict``, an NNX
        ``State`` (e.g. ``nnx.state(model, nnx.Param)``, with or without ``Variable`` wrappers).
      batches: an iterable of batch pytrees whose leaves share a leading example axis.
      max_grad_norm: if given, each parameter tensor's gradient is clipped on its own to this
        norm before squaring, as the official code does with ``clip_grad_norm_(param, norm)``.
      per_example: if True, the mean of squared per-example gradients (the paper's definition);
        otherwise the mean over batches of the squared batch-mean gradient (the official code).
      rng: a PRNG key; batch ``i`` gets ``fold_in(rng, i)``, and the example or device index is
        folded in below that. ``None``: ``loss_fn`` is called without one.
      devices: run data-parallel over these devices (e.g. ``jax.local_devices()``) with
        ``jax.pmap``: each batch's leading axis is split evenly over them and gradients averaged
        before squaring. A batch that does not split evenly is computed whole on one device, so the
        result equals the single-device estimate up to float rounding.
      chunk_size: examples vmapped together in the per-example rule (bounds memory).

    Returns:
      A float32 pytree with the structure of ``params`` (an NNX ``State`` keeps its ``Variable``
        wrappers), ready for :func:`childtuning_jax.fisher_mask`.

    Raises:
      ValueError: if ``batches`` is empty or a batch is malformed.
      FloatingPointError: if a Fisher value is NaN or infinite (names the parameter).
    """
    if max_grad_norm is not None and not (float(max_grad_norm) > 0):
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if rng is not None and not _takes_rng(loss_fn):
        raise TypeError("rng was given but loss_fn does not take a third (rng) argument")
    devices = list(devices) if devices is not None else None
    options = dict(
        max_grad_norm=max_grad_norm,
        per_example=per_example,
        chunk_size=chunk_size,
        has_rng=rng is not None,
    )

    single_step = _compiled_steps(loss_fn, tuple(sorted(options.items())), None)
    zeros = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)

    use_pmap = devices is not None and len(devices) > 1
    if use_pmap:
        pmap_step = _compiled_steps(loss_fn, tuple(sorted(options.items())), tuple(devices))
        replicated_params = parallel.replicate(params, devices)
        replicated_acc = parallel.replicate(zeros, devices)
        single_params = jax.device_put(params, devices[0])
    else:
        single_params = params
    single_acc = zeros

    num_batches = 0
    num_examples = 0
    for index, batch in enumerate(batches):
        size = _batch_size(batch)
        # Without an rng the rules ignore this placeholder key (pmap needs a concrete argument).
        batch_rng = jax.random.PRNGKey(0) if rng is None else jax.random.fold_in(rng, index)
        if use_pmap and size % len(devices) == 0:
            replicated_acc = pmap_step(
                replicated_acc, replicated_params, parallel.shard(batch, devices), batch_rng
            )
        else:
            single_acc = single_step(single_acc, single_params, batch, batch_rng)
        num_batches += 1
        num_examples += size
    if num_batches == 0:
        raise ValueError("batches is empty: the Fisher information needs at least one batch")

    total = single_acc
    if use_pmap:
        total = _tree_add(jax.device_put(parallel.unreplicate(replicated_acc), devices[0]), total)
    count = num_examples if per_example else num_batches
    fisher = jax.tree.map(lambda x: x / count, total)
    _check_finite(fisher)
    return fisher
