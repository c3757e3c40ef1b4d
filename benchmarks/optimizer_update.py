"""Optimizer update only: the cost Child-Tuning adds to ``optax.adamw`` on a BERT-base pytree.

Each contender is one jitted ``(params, opt_state) <- update(grads)``, in two forms that run
interleaved on one shared state per transform:

* donated: params and state donated (updated in place), as the suite's training steps run;
* ``(no donation)``: fresh output buffers each call, replacing the inputs, the way
  ``nnx.Optimizer`` and most optax training loops run it. On CPU this form also pays the page
  faults of its fresh outputs, so its absolute times are higher.

Contenders:

* ``adamw``: ``optax.adamw`` alone (weight decay masked off biases and LayerNorm, as in the
  official recipe);
* ``F``: ``chain(child_tuning_f(p, key), adamw)`` (default hash sampler);
* ``D``: ``chain(child_tuning_d(mask), adamw)``;
* ``F-bernoulli``: F with ``sampler="jax"`` (``jax.random.bernoulli`` per element), for
  reference, timed on its own afterwards, donated only (it is several times slower on CPU).

Targets (issue 11), in both forms: F / adamw <= 1.10, D / adamw <= 1.05.

``dispatch`` repeats the three contenders on the same tree with every dimension cut to 2: the
compute vanishes and what is left is the per-call cost of the jitted update (arguments, outputs,
one small kernel per op), which is what a GPU's millisecond update mostly pays. A D state of one
mask leaf per parameter paid that cost on the GPU (see RESULTS.md); the flat state removes it,
and this row shows the per-leaf cost on any machine.

Run alone: ``python -m benchmarks.run --only optimizer_update --no-plots``.
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


NO_DONATION = " (no donation)"  # suffix of the contenders' names in the undonated form
TARGETS = {"F": 1.10, "D": 1.05}  # largest ratio to adamw, in both forms


def _contenders(
    name: str, tx: optax.GradientTransformation, params: Any, grads: Any
) -> dict[str, Callable[[], Any]]:
    """Two closures on one own copy of params and state: a jitted update that donates them
    (``name``) and one that does not (``name`` + :data:`NO_DONATION`); each keeps the new params
    and state, so both forms step the same state."""

    @jax.jit
    def _copy(tree):
        return jax.tree.map(jnp.copy, tree)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    box = {"params": _copy(params)}  # own copy: donation consumes it
    box["state"] = tx.init(box["params"])

    def contender(step: Callable) -> Callable[[], Any]:
        def call():
            box["params"], box["state"] = common.block(step(box["params"], box["state"], grads))

        return call

    return {
        name: contender(jax.jit(update, donate_argnums=(0, 1))),
        name + NO_DONATION: contender(jax.jit(update)),
    }


def _all_contenders(
    txs: dict[str, optax.GradientTransformation], params: Any, grads: Any
) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    for name, tx in txs.items():
        out.update(_contenders(name, tx, params, grads))
    return out


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
    contenders = _all_contenders(transforms(params, mask), params, grads)
    samples = common.alternate(contenders, rounds=rounds, warmup=3)
    return {"leaves": len(tiny), "rounds": rounds, **_times_and_ratios(samples)}


def _ratios(samples: dict[str, list[float]], base: str, names: list[str]) -> dict[str, Any]:
    """Each name's ratio to ``base``: of the medians (``ratios_to_adamw``), and the median of
    the per-round ratios (``paired_ratios_to_adamw``: contenders of one round ran back to back,
    so this one drifts less with the machine's load)."""
    label = lambda name: name.removesuffix(NO_DONATION)
    return {
        "ratios_to_adamw": {label(n): common.ratio(samples, n, base) for n in names},
        "paired_ratios_to_adamw": {
            label(n): common.median([a / b for a, b in zip(samples[n], samples[base], strict=True)])
            for n in names
            if len(samples[n]) == len(samples[base])
        },
    }


def _times_and_ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Every contender's times; ratios to adamw of the donated form (top level) and of the
    undonated one (``no_donation``)."""
    donated = [n for n in samples if n != "adamw" and not n.endswith(NO_DONATION)]
    out: dict[str, Any] = {
        "times": {name: common.summarize(s) for name, s in samples.items()},
        **_ratios(samples, "adamw", donated),
    }
    base = "adamw" + NO_DONATION
    if base in samples:
        undonated = [n for n in samples if n != base and n.endswith(NO_DONATION)]
        out["no_donation"] = _ratios(samples, base, undonated)
    return out


def run(
    *,
    smoke: bool = False,
    shape: common.BertShape | None = None,
    rounds: int | None = None,
    bernoulli_rounds: int | None = None,
    dispatch_rounds: int | None = None,
) -> dict[str, Any]:
    """Alternates adamw / F / D, each donated and not, for ``rounds``; then F with
    ``jax.random.bernoulli``, which is several times slower on CPU, alone and donated for
    ``bernoulli_rounds`` (0 skips it); then the dispatch-bound variant (tiny leaves) for
    ``dispatch_rounds`` (0 skips it)."""
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
    contenders = _all_contenders(transforms(params, mask), params, grads)
    samples = common.alternate(contenders, rounds=rounds, warmup=1)
    del contenders
    gc.collect()
    if bernoulli_rounds:
        (tx,) = transforms(params, mask, bernoulli=True).values()
        contenders = {"F-bernoulli": _contenders("F-bernoulli", tx, params, grads)["F-bernoulli"]}
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
        out["targets"] = {}
        forms = (
            ("donated", out["ratios_to_adamw"]),
            ("no donation", out["no_donation"]["ratios_to_adamw"]),
        )
        for form, ratios in forms:
            for name, limit in TARGETS.items():
                value = ratios[name]
                out["targets"][f"{name} / adamw <= {limit} ({form})"] = {
                    "value": value,
                    "met": value <= limit,
                }
    return out
