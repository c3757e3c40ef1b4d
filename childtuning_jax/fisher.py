"""Fisher information of the parameters, the score ChildTuning-D selects its child network by.

Xu et al. (2021, Eq. 4) estimate the Fisher information of each parameter from the training data as
the mean squared gradient of the loss. Two estimators are offered:

* the official code's rule (default): for each batch, the gradient of the batch-mean loss,
  optionally clipped per parameter tensor (``torch.nn.utils.clip_grad_norm_`` applied to that one
  tensor), squared and summed; the sum divided by the number of batches (a partial last batch
  counts as one batch).
* ``per_example=True``: the paper's definition, the mean over examples of squared per-example
  gradients (vmapped over examples in chunks so memory stays bounded).

:func:`fisher_step` is one batch's share of the sum, written once: :func:`fisher_information` runs
it in a loop, and a trainer can map it over its devices (``axis_name``) and reduce.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from childtuning_jax import paths

LossFn = Callable[..., jax.Array]
FisherStep = Callable[[Any, Any, Any, "jax.Array | None"], Any]

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


def fisher_step(
    loss_fn: LossFn,
    *,
    max_grad_norm: float | None = None,
    per_example: bool = False,
    chunk_size: int = 8,
    axis_name: str | None = None,
) -> FisherStep:
    """``step(acc, params, batch, rng) -> acc + this batch's share of the Fisher sum``.

    Default rule: the squared gradient of the batch's loss, each tensor clipped to
    ``max_grad_norm`` on its own first; per-example rule: the sum of the examples' squared
    (clipped) gradients. Squares are float32. ``rng`` ``None``: ``loss_fn(params, batch)``;
    otherwise ``loss_fn(params, batch, rng)`` (per example: one key each, split from ``rng``).

    Under ``axis_name`` (a mapped axis of devices, each holding a share of the batch) every device
    folds its index into ``rng``; the default rule averages the gradients over the axis before
    squaring (so ``loss_fn`` should give the whole batch's mean when averaged over devices), the
    per-example rule sums its squares over the axis.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    grad_fn = jax.grad(loss_fn)

    def grad(params, batch, rng):
        return grad_fn(params, batch) if rng is None else grad_fn(params, batch, rng)

    def batch_mean_rule(params, batch, rng):
        grads = grad(params, batch, rng)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        return _squared(grads, max_grad_norm)

    def example_sq(params, example, rng):
        single = jax.tree.map(lambda x: x[None], example)
        return _squared(grad(params, single, rng), max_grad_norm)

    def chunk_sum(params, chunk, chunk_rngs):
        rng_axis = None if chunk_rngs is None else 0
        sq = jax.vmap(example_sq, in_axes=(None, 0, rng_axis))(params, chunk, chunk_rngs)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), sq)

    def per_example_rule(params, batch, rng):
        n = _batch_size(batch)
        example_rngs = None if rng is None else jax.random.split(rng, n)
        full, rest = divmod(n, chunk_size)
        total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if full:
            split = lambda x: x[: full * chunk_size].reshape(full, chunk_size, *x.shape[1:])
            chunk_rngs = None if example_rngs is None else split(example_rngs)

            def body(acc, xs):
                chunk, rngs = xs
                return _tree_add(acc, chunk_sum(params, chunk, rngs)), None

            total, _ = jax.lax.scan(body, total, (jax.tree.map(split, batch), chunk_rngs))
        if rest:
            tail = lambda x: x[full * chunk_size :]
            tail_rngs = None if example_rngs is None else tail(example_rngs)
            total = _tree_add(total, chunk_sum(params, jax.tree.map(tail, batch), tail_rngs))
        if axis_name is not None:
            total = jax.lax.psum(total, axis_name)
        return total

    rule = per_example_rule if per_example else batch_mean_rule

    def step(acc: Any, params: Any, batch: Any, rng: jax.Array | None) -> Any:
        if rng is not None and axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        return _tree_add(acc, rule(params, batch, rng))

    return step


def check_finite(fisher: Any) -> None:
    """Raises ``FloatingPointError`` naming the first parameter whose Fisher value is NaN or inf."""
    finite = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), fisher)
    for name, ok in zip(paths.leaf_names(finite), jax.tree.leaves(finite), strict=True):
        if not bool(ok):
            raise FloatingPointError(
                f"Fisher information of '{name}' is not finite (NaN or inf gradients); "
                "check the loss and the inputs"
            )


def fisher_mean(total: Any, count: int) -> Any:
    """The Fisher sum over ``count`` batches (or examples) as a mean, checked to be finite."""
    if count == 0:
        raise ValueError("batches is empty: the Fisher information needs at least one batch")
    fisher = jax.tree.map(lambda x: x / count, total)
    check_finite(fisher)
    return fisher


_AXIS = "devices"


@functools.lru_cache(maxsize=32)
def _compiled_step(
    loss_fn: LossFn, options: tuple[tuple[str, Any], ...], devices: tuple[jax.Device, ...] | None
) -> Callable[..., Any]:
    """:func:`fisher_step` jitted with the accumulator donated, cached so repeated passes with the
    same ``loss_fn`` and options reuse their compilation. With ``devices``: mapped over them
    (``jax.shard_map``), each device taking its share of the batch's leading axis."""
    if devices is None:
        return jax.jit(fisher_step(loss_fn, **dict(options)), donate_argnums=0)
    step = jax.shard_map(
        fisher_step(loss_fn, axis_name=_AXIS, **dict(options)),
        mesh=Mesh(np.asarray(devices), (_AXIS,)),
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(_AXIS), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,  # per-device gradients, as under pmap (the step averages them itself)
    )
    return jax.jit(step, donate_argnums=0)


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
        ``jax.shard_map``: each batch's leading axis is split evenly over them and gradients
        averaged before squaring. A batch that does not split evenly is computed whole, so the
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
    if rng is not None and not _takes_rng(loss_fn):
        raise TypeError("rng was given but loss_fn does not take a third (rng) argument")
    options = tuple(
        sorted(
            dict(
                max_grad_norm=max_grad_norm, per_example=per_example, chunk_size=chunk_size
            ).items()
        )
    )
    step = mapped_step = _compiled_step(loss_fn, options, None)
    acc = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    whole = split = None
    if devices is not None and len(devices) > 1:
        mapped_step = _compiled_step(loss_fn, options, tuple(devices))
        mesh = Mesh(np.asarray(devices), (_AXIS,))
        whole, split = (
            NamedSharding(mesh, PartitionSpec()),
            NamedSharding(mesh, PartitionSpec(_AXIS)),
        )
        acc, params = jax.device_put((acc, params), whole)
    num_batches = num_examples = 0
    for index, batch in enumerate(batches):
        size = _batch_size(batch)
        batch_rng = None if rng is None else jax.random.fold_in(rng, index)
        if split is not None and size % len(devices) == 0:
            acc = mapped_step(acc, params, jax.device_put(batch, split), batch_rng)
        else:  # one device, or a batch that does not split: computed whole (on every device)
            batch = batch if whole is None else jax.device_put(batch, whole)
            acc = step(acc, params, batch, batch_rng)
        num_batches += 1
        num_examples += size
    fisher = fisher_mean(acc, num_examples if per_example else num_batches)
    return fisher if whole is None else jax.device_put(fisher, devices[0])
