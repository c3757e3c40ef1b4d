"""The trainer's pmapped train step over 1, 2 and 4 host CPU devices: identical results, timings.

Runs in a fresh process with ``--xla_force_host_platform_device_count=4`` (the device count is
fixed when JAX starts). The step is ``childtuning_trainer.steps.make_train_step`` (what
``train.py`` runs) with
the official optimizer chain for vanilla, F and D, dropout off so results are deterministic. The
same global batch (split over the devices) and the same initial state must give the same params
after a few steps on 1, 2 and 4 devices (up to float rounding of the cross-device mean); then each
step is timed. On a 2-core CPU the "devices" share the cores, so the timings are informative only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from benchmarks import common, subprocess_util

DEVICE_COUNTS = (1, 2, 4)
SMALL = common.BertShape("bert-small-2L", hidden=128, layers=2, intermediate=512)


def child(smoke: bool) -> dict[str, Any]:
    """Smoke: the tiny model, D only, on 1 and 2 devices; otherwise all modes on 1, 2, 4."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import workloads
    from childtuning_trainer import parallel, steps

    shape = common.BERT_TINY if smoke else SMALL
    global_batch, seq_len = (4, 16) if smoke else (8, 128)
    check_steps, rounds = (2, 2) if smoke else (2, 3)
    modes = ("D",) if smoke else workloads.MODES
    counts = DEVICE_COUNTS[:2] if smoke else DEVICE_COUNTS
    config = workloads.hf_config(shape)
    model = workloads.JaxModel(config)
    mask = workloads.random_child_mask(model.params)
    batches = workloads.random_batches(
        config, num=check_steps, batch_size=global_batch, seq_len=seq_len
    )
    for batch in batches:
        batch["weights"] = np.ones((global_batch,), np.float32)
    devices_all = jax.local_devices()
    if len(devices_all) < max(counts):
        raise RuntimeError(f"need {max(counts)} host devices, got {len(devices_all)}")

    results: dict[str, Any] = {}
    for mode in modes:
        tx = workloads.make_tx(mode, model.params, mask)
        step_fn = steps.make_train_step(model.objective, tx, dropout=False)
        host_state = steps.TrainState(jnp.zeros((), jnp.int32), model.params, tx.init(model.params))
        final: dict[int, Any] = {}
        per_mode: dict[str, Any] = {}
        for n in counts:
            devices = devices_all[:n]
            p_step = parallel.map_train_step(step_fn, devices)
            state = parallel.replicate(host_state, devices)
            rng = jax.random.key(0)
            start = time.perf_counter()
            losses = []
            for batch in batches:  # correctness run (the first call compiles)
                state, metrics = common.block(
                    p_step(state, parallel.shard_batch(batch, devices), rng)
                )
                losses.append(float(metrics["loss"][0]))
            first_s = time.perf_counter() - start
            final[n] = parallel.to_host(state.params)
            sharded = parallel.shard_batch(batches[0], devices)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                state, _ = common.block(p_step(state, sharded, rng))
                times.append(time.perf_counter() - start)
            per_mode[str(n)] = {
                "losses": losses,
                "correctness_run_incl_compile_s": first_s,
                "step": common.summarize(times),
            }
        for n in counts[1:]:
            diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final[1], final[n])
            per_mode[str(n)]["max_abs_param_diff_vs_1"] = max(jax.tree.leaves(diffs))
        base = per_mode["1"]["step"]["median_s"]
        for n in counts:
            per_mode[str(n)]["speedup_vs_1"] = base / per_mode[str(n)]["step"]["median_s"]
        results[mode] = per_mode
    max_diff = max(
        results[m][str(n)]["max_abs_param_diff_vs_1"] for m in results for n in counts[1:]
    )
    return {
        "shape": shape.name,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "device_counts": list(counts),
        "host_cores": os.cpu_count(),
        "modes": results,
        "max_abs_param_diff": max_diff,
        "identical_within_1e-5": max_diff <= 1e-5,
    }


def run(*, smoke: bool = False) -> dict[str, Any]:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "device_count" not in f)
    env = {
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={max(DEVICE_COUNTS)}".strip()
    }
    args = ["--child"] + (["--smoke"] if smoke else [])
    return subprocess_util.run_module("benchmarks.pmap_scaling", args, env=env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args(argv)
    subprocess_util.emit(child(a.smoke))


if __name__ == "__main__":
    main(sys.argv[1:])
