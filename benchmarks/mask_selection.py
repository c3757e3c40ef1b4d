"""Mask selection: ``childtuning_jax.fisher_mask`` against the official procedure.

The official code (AliceMind ``ChildTuning``, ``calculate_fisher``) grows one array with
``np.append`` over every eligible Fisher tensor, then takes ``np.percentile`` of it (see
:func:`benchmarks.reference.official_fisher_mask`). Both run on the same BERT-shaped Fisher
pytree (float32 JAX arrays, as ``fisher_information`` returns them); the masks must agree element
for element. Targets (issue 2): >= 30x faster on BERT-base, BERT-large under 3 s on 2 cores.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.reference import official_fisher_mask
from childtuning_jax import fisher_mask, leaf_names

RESERVE_P = 0.3


def _fisher_tree(shape: common.BertShape, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """(flat name -> JAX array, nested pytree of the same arrays)."""
    flat = {
        name: jnp.asarray(values)
        for name, values in common.random_fisher(common.bert_param_shapes(shape), seed).items()
    }
    return flat, common.nest(flat)


def _mismatches(ours: Any, reference: dict[str, np.ndarray]) -> int:
    """Elements where the two masks differ, over the eligible leaves (ours must also keep every
    non-eligible leaf whole)."""
    ours_flat = dict(zip(leaf_names(ours), jax.tree.leaves(ours), strict=True))
    differing = 0
    for name, mask in ours_flat.items():
        mask = np.asarray(mask)
        if name in reference:
            differing += int(np.count_nonzero(mask != reference[name]))
        else:
            differing += int(np.count_nonzero(~mask))
    return differing


def measure(shape: common.BertShape, *, rounds: int, reference_rounds: int) -> dict[str, Any]:
    """Times both procedures on one shape (reference ``reference_rounds`` times, ours ``rounds``
    times, alternating while both run) and checks the masks agree."""
    flat, tree = _fisher_tree(shape)
    shapes = common.bert_param_shapes(shape)
    ours_mask = common.block(fisher_mask(tree, RESERVE_P))  # warm-up (and the mask to compare)
    samples: dict[str, list[float]] = {"ours": [], "official": []}
    ref_mask = None
    for r in range(max(rounds, reference_rounds)):
        if r < reference_rounds:
            start = time.perf_counter()
            ref_mask = official_fisher_mask(flat, RESERVE_P)
            samples["official"].append(time.perf_counter() - start)
            gc.collect()
        if r < rounds:
            start = time.perf_counter()
            ours_mask = common.block(fisher_mask(tree, RESERVE_P))
            samples["ours"].append(time.perf_counter() - start)
    assert ref_mask is not None
    kept = sum(int(np.count_nonzero(m)) for m in ref_mask.values())
    eligible = common.count_params(shapes, eligible_only=True)
    result = {
        "shape": shape.name,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "reserve_p": RESERVE_P,
        "params": common.count_params(shapes),
        "eligible_params": eligible,
        "kept_fraction": kept / eligible,
        "mismatched_elements": _mismatches(ours_mask, ref_mask),
        "ours": common.summarize(samples["ours"]),
        "official": common.summarize(samples["official"]),
        "speedup": common.median(samples["official"]) / common.median(samples["ours"]),
    }
    del flat, tree, ours_mask, ref_mask
    gc.collect()
    return result


def run(*, smoke: bool = False) -> dict[str, Any]:
    """Main shapes (BERT-base, BERT-large) plus a size sweep for the plot."""
    if smoke:
        main = [common.BERT_TINY]
        sweep = [common.BertShape("bert-tiny-4", 32, 4, 64, vocab=128, max_position=64)]
        rounds, ref_rounds = 2, 1
    else:
        main = [common.BERT_BASE, common.BERT_LARGE]
        sweep = [
            common.BertShape("bert-base-1L", 768, 1, 3072),
            common.BertShape("bert-base-3L", 768, 3, 3072),
            common.BertShape("bert-base-6L", 768, 6, 3072),
        ]
        rounds, ref_rounds = 5, 2
    # The official procedure on BERT-large takes about a minute: once is enough for its median.
    results = {
        s.name: measure(s, rounds=rounds, reference_rounds=1 if s.layers > 12 else ref_rounds)
        for s in main
    }
    sweep_results = {s.name: measure(s, rounds=3, reference_rounds=1) for s in sweep}
    out: dict[str, Any] = {"main": results, "sweep": sweep_results}
    if not smoke:
        base, large = results["bert-base"], results["bert-large"]
        out["targets"] = {
            "bert-base speedup >= 30x": {
                "value": base["speedup"],
                "met": base["speedup"] >= 30 and base["mismatched_elements"] == 0,
            },
            "bert-large ours < 3 s": {
                "value": large["ours"]["median_s"],
                "met": large["ours"]["median_s"] < 3 and large["mismatched_elements"] == 0,
            },
        }
    return out
