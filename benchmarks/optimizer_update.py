"""Optimizer update only: the cost Child-Tuning adds to ``optax.adamw`` on a BERT-base pytree.

Each contender is one jitted ``(params, opt_state) <- update(grads)`` with params and state
donated (updated in place, as in a training step). Contenders:

* ``adamw``: ``optax.adamw`` alone (weight decay masked off biases and LayerNorm, as in the
  official recipe);
* ``F``: ``chain(child_tuning_f(p, key), adamw)`` (default hash sampler);
* ``D``: ``chain(child_tuning_d(mask), adamw)``;
* ``F-bernoulli``: F with ``sampler="jax"`` (``jax.random.bernoulli`` per element), for
  reference, timed on its own afterwards (it is several times slower on CPU).

Targets (issue 2): F / adamw <= 1.3, D / adamw <= 1.05.

``dispatch`` repeats the three contenders on the same tree with every dimension cut to 2: the
compute vanishes and what is left is the per-call cost of the jitted, donating update (arguments,
outputs, one small kernel per op), which is what a GPU's millisecond update mostly pays. A D
state of one mask leaf per parameter paid that cost on the GPU (see RESULTS.md); the flat state is
meant to remove it, and this row shows the per-leaf cost on any machine.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from childtuning_jax import (
    child_tuning_d,
    child_tuning_f,
    fisher_mask,
    map_with_name,
    official_eligibility,
)

RESERVE_P = 0.3


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not biases, not LayerNorm (the official no-decay list)."""
    return map_with_name(
        lambda name, _: not name.endswith("bias") and "LayerNorm" not in name, params
    )


def transforms(
    params: Any, mask: Any, *, lr: float = 2e-5, bernoulli: bool = False
) -> dict[str, optax.GradientTransformation]:
    adamw = optax.adamw(lr, eps=1e-6, weight_decay=0.01, mask=decay_mask(params))
    key = jax.random.key(0)
    if bernoulli:
        return {"F-bernoulli": optax.chain(child_tuning_f(RESERVE_P, key, sampler="jax"), adamw)}
    return {
        "adamw": adamw,
        "F": optax.chain(child_tuning_f(RESERVE_P, key), adamw),
        "D": optax.chain(child_tuning_d(mask), adamw),
    }


def _random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> Any:
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(scale)
        flat[name] = jnp.asarray(values)
    return common.nest(flat)


def _contender(tx: optax.GradientTransformation, params: Any, grads: Any) -> Callable[[], Any]:
    """A closure that runs one donated, jitted update and keeps the new params and state."""

    @jax.jit
    def _copy(tree):
        return jax.tree.map(jnp.copy, tree)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(update, donate_argnums=(0, 1))
    box = {"params": _copy(params)}  # own copy: donation consumes it
    box["state"] = tx.init(box["params"])

    def call():
        box["params"], box["state"] = common.block(step(box["params"], box["state"], grads))

    return call


def _dispatch_bound(shapes: dict[str, tuple[int, ...]], *, rounds: int) -> dict[str, Any]:
    """The contenders on ``shapes``' tree with every dimension 2 (per-call cost only)."""
    tiny = {name: (2,) * len(shape) for name, shape in shapes.items()}
    params = _random_tree(tiny, seed=0, scale=0.02)
    grads = _random_tree(tiny, seed=1, scale=1e-3)
    # A full-size mask's layout: every encoder-layer leaf mixed, every other leaf all True.
    mask = common.nest(
        {
            name: (np.arange(math.prod(shape)) % 2 == 0).reshape(shape)
            if official_eligibility(name)
            else np.ones(shape, bool)
            for name, shape in tiny.items()
        }
    )
    contenders = {
        name: _contender(tx, params, grads) for name, tx in transforms(params, mask).items()
    }
    samples = common.alternate(contenders, rounds=rounds, warmup=3)
    return {"leaves": len(tiny), "rounds": rounds, **_times_and_ratios(samples)}


def _times_and_ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "times": {name: common.summarize(s) for name, s in samples.items()},
        "ratios_to_adamw": {
            name: common.ratio(samples, name, "adamw") for name in samples if name != "adamw"
        },
    }


def run(
    *,
    smoke: bool = False,
    shape: common.BertShape | None = None,
    rounds: int | None = None,
    bernoulli_rounds: int | None = None,
    dispatch_rounds: int | None = None,
) -> dict[str, Any]:
    """Alternates adamw / F / D for ``rounds``; then F with ``jax.random.bernoulli``, which is
    several times slower on CPU, alone for ``bernoulli_rounds`` (0 skips it); then the
    dispatch-bound variant (tiny leaves) for ``dispatch_rounds`` (0 skips it)."""
    shape = shape or (common.BERT_TINY if smoke else common.BERT_BASE)
    rounds = rounds or (3 if smoke else 20)
    bernoulli_rounds = (0 if smoke else 3) if bernoulli_rounds is None else bernoulli_rounds
    dispatch_rounds = (3 if smoke else 100) if dispatch_rounds is None else dispatch_rounds
    shapes = common.bert_param_shapes(shape)
    if smoke:  # a few leaves of each kind: compiling is most of a smoke run's time
        keep = ("word_embeddings", "layer/0/attention/self/query", "classifier")
        shapes = {n: s for n, s in shapes.items() if any(k in n for k in keep)}
    params = _random_tree(shapes, seed=0, scale=0.02)
    grads = _random_tree(shapes, seed=1, scale=1e-3)
    fisher = common.nest({n: jnp.asarray(v) for n, v in common.random_fisher(shapes).items()})
    mask = fisher_mask(fisher, RESERVE_P)
    del fisher
    gc.collect()
    contenders = {
        name: _contender(tx, params, grads) for name, tx in transforms(params, mask).items()
    }
    samples = common.alternate(contenders, rounds=rounds, warmup=1)
    del contenders
    gc.collect()
    if bernoulli_rounds:
        (tx,) = transforms(params, mask, bernoulli=True).values()
        contenders = {"F-bernoulli": _contender(tx, params, grads)}
        samples.update(common.alternate(contenders, rounds=bernoulli_rounds, warmup=1))
        del contenders
    dispatch = _dispatch_bound(shapes, rounds=dispatch_rounds) if dispatch_rounds else None
    out: dict[str, Any] = {
        "shape": shape.name,
        "params": common.count_params(shapes),
        "reserve_p": RESERVE_P,
        "rounds": rounds,
        **_times_and_ratios(samples),
    }
    if dispatch is not None:
        out["dispatch"] = dispatch
    if not smoke:
        r = out["ratios_to_adamw"]
        out["targets"] = {
            "F / adamw <= 1.3": {"value": r["F"], "met": r["F"] <= 1.3},
            "D / adamw <= 1.05": {"value": r["D"], "met": r["D"] <= 1.05},
        }
    return out
