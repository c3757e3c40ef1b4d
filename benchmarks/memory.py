"""Peak host memory of a ChildTuning-D (and F) run against a vanilla run.

Each run is a fresh process (``python -m benchmarks.memory --child MODE``, the modes run
concurrently) so runs cannot pollute each other's peak. A run does what a user's script does:
build the model, for D compute the Fisher information on one batch and the mask (then drop the
Fisher values), build the optimizer, ``init`` it, compile the jitted train step (params and state
donated), then train a few steps.
Two peaks are read from ``/proc/self/status``:

* ``setup_peak``: ``VmHWM`` over everything before training (includes the Fisher pass and XLA
  compilation);
* ``train_peak``: ``VmHWM`` over the training steps only (the counter is reset just before them
  with ``/proc/self/clear_refs``, after returning freed heap to the OS).

* ``accounted_peak``: what XLA accounts for, all live arrays before training plus the compiled
  step's temporaries (deterministic; the RSS peaks also hold compiler and allocator residue).

Target (issue 5): D's peak exceeds vanilla's by at most one byte per parameter.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import common, subprocess_util

SHAPES = {
    "bert-base": common.BERT_BASE,
    "bert-tiny": common.BERT_TINY,
}


def child(
    mode: str, shape_name: str, steps: int, batch_size: int, seq_len: int, fisher: bool = True
) -> dict[str, Any]:
    """One run; ``fisher=False`` takes D's mask from random values instead (smoke runs)."""
    import jax

    from benchmarks import workloads
    from childtuning_jax import fisher_information, fisher_mask

    shape = SHAPES[shape_name]
    config = workloads.hf_config(shape)
    batches = workloads.random_batches(config, num=1, batch_size=batch_size, seq_len=seq_len)
    model = workloads.JaxModel(config)
    params, model.params = model.params, None
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    key = jax.random.key(0)
    mask = None
    if mode == "D" and fisher:
        values = fisher_information(model.loss, params, batches, rng=key)
        mask = fisher_mask(values, workloads.RESERVE_P)
        del values
    elif mode == "D":
        mask = workloads.random_child_mask(params)
    tx = workloads.make_tx(mode, params, mask)
    del mask  # the transform holds what it needs
    opt_state = tx.init(params)
    step = workloads.make_train_step(model, tx)
    compiled = step.lower(params, opt_state, batches[0], key).compile()
    # What XLA accounts for: every live array (params, optimizer state, mask) plus the step's
    # temporaries (its outputs reuse the donated inputs).
    live_bytes = sum(x.nbytes for x in jax.live_arrays())
    analysis = compiled.memory_analysis()
    temp_bytes = analysis.temp_size_in_bytes if analysis is not None else 0
    setup_peak = common.proc_status_kib("VmHWM")
    jax.clear_caches()  # tracing and compilation caches: not part of what training holds
    reset_ok = common.reset_peak_rss()
    rss_before = common.proc_status_kib("VmRSS")
    for i in range(steps):
        params, opt_state, loss = compiled(
            params, opt_state, batches[0], jax.random.fold_in(key, i)
        )
        common.block(loss)
    return {
        "mode": mode,
        "shape": shape_name,
        "params": num_params,
        "steps": steps,
        "fisher_pass": mode == "D" and fisher,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "peak_reset": reset_ok,
        "setup_peak_mib": setup_peak / 1024,
        "rss_before_train_mib": rss_before / 1024,
        "train_peak_mib": common.proc_status_kib("VmHWM") / 1024,
        "live_arrays_mib": live_bytes / 2**20,
        "step_temp_mib": temp_bytes / 2**20,
        "accounted_peak_mib": (live_bytes + temp_bytes) / 2**20,
    }


def run(*, smoke: bool = False, modes: tuple[str, ...] = ("vanilla", "D", "F")) -> dict[str, Any]:
    shape = "bert-tiny" if smoke else "bert-base"
    args = ["--shape", shape, "--steps", "2", "--batch-size", "2" if smoke else "8"]
    args += ["--seq-len", "16" if smoke else "128"] + (["--no-fisher"] if smoke else [])
    # One process per mode, all at once: each reads only its own peak, and compiling is
    # single-threaded, so the runs overlap well on a few cores.
    with ThreadPoolExecutor(max_workers=len(modes)) as pool:
        futures = {
            m: pool.submit(subprocess_util.run_module, "benchmarks.memory", ["--child", m, *args])
            for m in modes
        }
        runs = {m: f.result() for m, f in futures.items()}
    base = runs["vanilla"]
    out: dict[str, Any] = {"runs": runs, "params": base["params"]}
    for mode in modes:
        if mode == "vanilla":
            continue
        for measure in ("accounted_peak", "train_peak", "rss_before_train", "setup_peak"):
            extra = (runs[mode][f"{measure}_mib"] - base[f"{measure}_mib"]) * 2**20
            out[f"{mode}_{measure}_extra_bytes_per_param"] = extra / base["params"]
    if not smoke and "D" in modes:
        accounted = out["D_accounted_peak_extra_bytes_per_param"]
        rss = out["D_train_peak_extra_bytes_per_param"]
        out["targets"] = {
            "D - vanilla <= 1 byte/param (XLA-accounted peak)": {
                "value": accounted,
                "met": accounted <= 1.0,
            },
            "D - vanilla <= 1 byte/param (RSS peak while training)": {
                "value": rss,
                "met": rss <= 1.0,
            },
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("vanilla", "F", "D"), required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-fisher", action="store_true", help="D: random mask, no Fisher pass")
    a = parser.parse_args(argv)
    result = child(a.child, a.shape, a.steps, a.batch_size, a.seq_len, fisher=not a.no_fisher)
    subprocess_util.emit(result)


if __name__ == "__main__":
    main(sys.argv[1:])
