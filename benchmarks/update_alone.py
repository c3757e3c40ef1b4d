"""The optimizer update alone, per leaf against flat, next to the memory-bandwidth limit.

The trainer's chain ``clip -> child (vanilla | F | D) -> adamw`` (:mod:`benchmarks.workloads`'
settings) on a BERT-shaped params tree of random values, each contender one jitted
``(params, opt_state) <- update(grads)`` with params and state donated, alternating round by
round, one mode at a time (medians):

* ``per-leaf``: ``make_optimizer(flat=False)``, one loop per leaf (and op);
* ``flat``: ``make_optimizer(flat=True)``, the chain in ``childtuning_jax.flat_update``'s view,
  params and gradients still trees (the trainer's form: gradients and params concatenated into
  the buffers, updates sliced back per leaf);
* ``held flat``: params and gradients already flat buffers (``FlatLayout.flatten``) and the
  inner chain alone (``make_optimizer(held=True)``), the trainer's form with the flat chain
  (:mod:`childtuning_trainer.held_flat`).

The limit: an update reads gradients, params, mu and nu and writes params, mu and nu, 28 bytes
per float32 parameter (D reads 1/8 byte of mask bits more), so it cannot take less than
``params * bytes / bandwidth``; ``over_limit`` is each median over that (``--bandwidth``,
default 4.3e12 B/s, an H200's HBM). On a CPU the ratio only says how far the host is from that
device. Run: ``python -m benchmarks.update_alone`` (``--smoke`` for tiny shapes).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import common, optimizer_update, records, workloads
from childtuning_jax import fisher_mask
from childtuning_trainer import optimizer_chain

H200_BANDWIDTH = 4.3e12  # bytes per second
BYTES_PER_PARAM = {"vanilla": 28.0, "F": 28.0, "D": 28.125}
FORMS = ("per-leaf", "flat", "held flat")


def _trees(shape: common.BertShape, smoke: bool) -> tuple[Any, Any, Any]:
    """Params, gradients and a D mask (top 30 % of a random Fisher) of ``shape``."""
    shapes = common.bert_param_shapes(shape)
    if smoke:  # a few leaves of each kind: compiling is most of a smoke run's time
        keep = ("word_embeddings", "layer/0/attention", "LayerNorm", "classifier")
        shapes = {n: s for n, s in shapes.items() if any(k in n for k in keep)}
    params = optimizer_update._random_tree(shapes, seed=0, scale=0.02)
    grads = optimizer_update._random_tree(shapes, seed=1, scale=1e-3)
    fisher = common.nest({n: jnp.asarray(v) for n, v in common.random_fisher(shapes).items()})
    return params, grads, fisher_mask(fisher, workloads.RESERVE_P)


def _child(mode: str, mask: Any) -> Callable:
    return lambda layout: optimizer_chain.child_transform(
        mode, reserve_p=workloads.RESERVE_P, key=jax.random.key(1), mask=mask, layout=layout
    )


def _held_flat(mode: str, params: Any, mask: Any) -> tuple[optax.GradientTransformation, Any]:
    """The trainer's chain for params held flat (``make_optimizer(held=True)``: the flat chain
    without its wrapper), and the layout its buffers follow."""
    return optimizer_chain.make_optimizer(
        _child(mode, mask), params, workloads.SETTINGS, flat=True, held=True
    )


def _contender(tx: optax.GradientTransformation, params: Any, grads: Any) -> Callable[[], None]:
    def update(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    step = jax.jit(update, donate_argnums=(0, 1))
    box = {"params": jax.tree.map(jnp.copy, params)}  # own copy: donation consumes it
    box["state"] = tx.init(box["params"])

    def call() -> None:
        box["params"], box["state"] = common.block(step(box["params"], box["state"], grads))

    return call


def run(
    *,
    smoke: bool = False,
    shape: common.BertShape | None = None,
    rounds: int | None = None,
    bandwidth: float = H200_BANDWIDTH,
    modes: tuple[str, ...] = optimizer_chain.MODES,
) -> dict[str, Any]:
    """Times the three forms of each mode in alternation; see the module docstring."""
    shape = shape or (common.BERT_TINY if smoke else common.BERT_BASE)
    rounds = rounds or (2 if smoke else 10)
    params, grads, mask = _trees(shape, smoke)
    samples: dict[str, list[float]] = {}
    for mode in modes:  # one mode at a time: three BERT-base states are 4 GB already
        child = _child(mode, mask)
        contenders: dict[str, Callable[[], None]] = {}
        for form, flat in (("per-leaf", False), ("flat", True)):
            tx = optimizer_chain.make_optimizer(child, params, workloads.SETTINGS, flat=flat)
            contenders[f"{mode}/{form}"] = _contender(tx, params, grads)
        tx, layout = _held_flat(mode, params, mask)
        contenders[f"{mode}/held flat"] = _contender(
            tx, layout.flatten(params), layout.flatten(grads)
        )
        samples.update(common.alternate(contenders, rounds=rounds, warmup=1))
        del contenders
        gc.collect()
    n = sum(p.size for p in jax.tree.leaves(params))
    times = {name: common.summarize(s) for name, s in samples.items()}
    limits = {mode: n * BYTES_PER_PARAM[mode] / bandwidth for mode in modes}
    return {
        "shape": shape.name,
        "params": n,
        "leaves": len(jax.tree.leaves(params)),
        "rounds": rounds,
        "bandwidth_bytes_per_s": bandwidth,
        "limit_s": limits,
        "times": times,
        "over_limit": {
            name: t["median_s"] / limits[name.split("/")[0]] for name, t in times.items()
        },
        "per_leaf_over_flat": {
            f"{mode}/{form}": common.ratio(samples, f"{mode}/per-leaf", f"{mode}/{form}")
            for mode in modes
            for form in FORMS[1:]
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (tests it on CPU)")
    parser.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="output directory (default: benchmarks/)")
    args = parser.parse_args(argv)
    if args.bandwidth <= 0:
        parser.error(f"--bandwidth must be > 0, got {args.bandwidth}")
    backend = jax.default_backend()
    suite = "smoke" if args.smoke else ("cpu" if backend == "cpu" else "gpu")
    record = records.new_record(suite, argv)
    record["command"] = " ".join(["python -m benchmarks.update_alone", *argv])
    start = time.perf_counter()
    shape = common.BERT_TINY if args.smoke else common.BERT_BASE
    result = run(smoke=args.smoke, rounds=args.rounds, bandwidth=args.bandwidth)
    record.update(
        results={"update_alone": {shape.name: result}},
        duration_s=time.perf_counter() - start,
        load_end=list(os.getloadavg()),
    )
    out_dir = args.out or records.HERE
    for key, path in records.write_outputs(record, out_dir, plots=False).items():
        print(f"[update_alone] wrote {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
