"""The trainer's train step over 1, 2 and 4 host CPU devices, ``pmap`` and ``jit`` layouts, and
over two processes x two devices (``jax.distributed``, gloo): identical results, timings.

Runs in fresh processes with ``--xla_force_host_platform_device_count`` (the device count is
fixed when JAX starts). The step is ``childtuning_trainer.steps.make_train_step`` (what
``train.py`` runs) with the official optimizer chain for vanilla, F and D, dropout off so results
are deterministic, mapped by ``childtuning_trainer.parallel`` (``pmap``, or ``jit`` over a mesh).
The same global batch (split over the devices) and the same initial state must give the same
params after a few steps on every layout (up to float rounding of the cross-device sum); then
each step is timed. On a 2-core CPU the "devices" and processes share the cores, so the timings
are informative only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common, subprocess_util

DEVICE_COUNTS = (1, 2, 4)
SMALL = common.BertShape("bert-small-2L", hidden=128, layers=2, intermediate=512)
TWO_PROCESS = "2x2"  # the two-process layout's label


def _workload(smoke: bool) -> dict[str, Any]:
    import numpy as np

    from benchmarks import workloads

    shape = common.BERT_TINY if smoke else SMALL
    global_batch, seq_len = (4, 16) if smoke else (8, 128)
    config = workloads.hf_config(shape)
    model = workloads.JaxModel(config)
    batches = workloads.random_batches(config, num=2, batch_size=global_batch, seq_len=seq_len)
    for batch in batches:
        batch["weights"] = np.ones((global_batch,), np.float32)
    return {
        "shape": shape,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "model": model,
        "mask": workloads.random_child_mask(model.params),
        "batches": batches,
        "rounds": 2 if smoke else 3,
        "modes": ("D",) if smoke else workloads.MODES,
    }


def _train(work: dict[str, Any], mode: str, layout: Any) -> tuple[dict[str, Any], Any]:
    """The correctness steps, then timed steps; returns the timings and the final params."""
    import jax
    import jax.numpy as jnp

    from benchmarks import workloads
    from childtuning_trainer import parallel, steps

    model = work["model"]
    tx = workloads.make_tx(mode, model.params, work["mask"])
    step_fn = steps.make_train_step(model.objective, tx, dropout=False)
    host_state = steps.TrainState(jnp.zeros((), jnp.int32), model.params, tx.init(model.params))
    p_step = parallel.map_train_step(step_fn, layout)
    state = parallel.replicate(host_state, layout)
    rng = jax.random.key(0)
    start = time.perf_counter()
    losses = []
    for batch in work["batches"]:  # correctness run (the first call compiles)
        state, metrics = common.block(p_step(state, parallel.shard_batch(batch, layout), rng))
        losses.append(float(metrics["loss"][0]))
    first_s = time.perf_counter() - start
    final = parallel.to_host(state.params)
    sharded = parallel.shard_batch(work["batches"][0], layout)
    times = []
    for _ in range(work["rounds"]):
        start = time.perf_counter()
        state, _ = common.block(p_step(state, sharded, rng))
        times.append(time.perf_counter() - start)
    timing = {
        "losses": losses,
        "correctness_run_incl_compile_s": first_s,
        "step": common.summarize(times),
    }
    return timing, final


def _max_diff(a: Any, b: Any) -> float:
    import jax
    import numpy as np

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _save(path: str, params: Any) -> None:
    import jax
    import numpy as np

    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(params)])


def _load(path: str) -> list:
    import numpy as np

    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def child(smoke: bool, params_dir: str) -> dict[str, Any]:
    """One process, 4 devices. Smoke: the tiny model, D only, on 1 and 2 devices (jit on 2);
    otherwise all modes on 1, 2, 4, pmap and jit. Saves the 4-device pmap params to compare."""
    import jax

    from childtuning_trainer import parallel

    work = _workload(smoke)
    counts = DEVICE_COUNTS[:2] if smoke else DEVICE_COUNTS
    if len(jax.local_devices()) < max(counts):
        raise RuntimeError(f"need {max(counts)} host devices, got {len(jax.local_devices())}")

    results: dict[str, Any] = {}
    for mode in work["modes"]:
        final: dict[int, Any] = {}
        per_mode: dict[str, Any] = {}
        for n in counts:
            per_mode[str(n)], final[n] = _train(work, mode, parallel.select_devices(n, "pmap"))
            if not smoke or n == counts[-1]:
                jit_timing, jit_params = _train(work, mode, parallel.select_devices(n, "jit"))
                jit_timing["max_abs_param_diff_vs_pmap"] = _max_diff(jit_params, final[n])
                per_mode[str(n)]["jit"] = jit_timing
        if params_dir:
            _save(os.path.join(params_dir, f"one_{mode}.npz"), final[counts[-1]])
        for n in counts[1:]:
            per_mode[str(n)]["max_abs_param_diff_vs_1"] = _max_diff(final[1], final[n])
        base = per_mode["1"]["step"]["median_s"]
        for n in counts:
            per_mode[str(n)]["speedup_vs_1"] = base / per_mode[str(n)]["step"]["median_s"]
        results[mode] = per_mode
    max_diff = max(
        results[m][str(n)]["max_abs_param_diff_vs_1"] for m in results for n in counts[1:]
    )
    jit_diff = max(
        v["jit"]["max_abs_param_diff_vs_pmap"]
        for r in results.values()
        for v in r.values()
        if "jit" in v
    )
    return {
        "shape": work["shape"].name,
        "global_batch": work["global_batch"],
        "seq_len": work["seq_len"],
        "device_counts": list(counts),
        "host_cores": os.cpu_count(),
        "modes": results,
        "max_abs_param_diff": max_diff,
        "max_abs_jit_vs_pmap_diff": jit_diff,
        "identical_within_1e-5": max(max_diff, jit_diff) <= 1e-5,
    }


def two_process_child(smoke: bool, address: str, process_id: int, params_dir: str) -> dict:
    """One of two processes with 2 devices each: every mode with pmap and jit over all four."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, 2, process_id)
    from childtuning_trainer import parallel

    work = _workload(smoke)
    results: dict[str, Any] = {}
    for mode in work["modes"]:
        for kind in ("pmap", "jit"):
            timing, params = _train(work, mode, parallel.select_devices(0, kind))
            one = _load(os.path.join(params_dir, f"one_{mode}.npz"))
            timing["max_abs_param_diff_vs_1x4"] = _max_diff(jax.tree.leaves(params), one)
            results.setdefault(mode, {})[kind] = timing
    return {"process": process_id, "modes": results}


def _run_two_processes(smoke: bool, params_dir: str, env: dict[str, str]) -> dict[str, Any]:
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    args = ["--two_process", address, "--params_dir", params_dir] + (["--smoke"] if smoke else [])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pmap_scaling", *args, "--process_id", str(i)],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    marker = "BENCHMARK-RESULT "
    lines = [line for line in outputs[0].splitlines() if line.startswith(marker)]
    if any(p.returncode for p in procs) or not lines:
        raise RuntimeError(f"two-process run failed:\n{outputs[0][-2000:]}\n{outputs[1][-2000:]}")
    return json.loads(lines[-1][len(marker) :])


def run(*, smoke: bool = False) -> dict[str, Any]:
    """The 1-process layouts; then (full run only) two processes x two devices."""

    def device_env(count: int) -> dict[str, str]:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if "device_count" not in f)
        return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip()}

    with tempfile.TemporaryDirectory() as params_dir:
        args = ["--child", "--params_dir", params_dir] + (["--smoke"] if smoke else [])
        result = subprocess_util.run_module(
            "benchmarks.pmap_scaling", args, env=device_env(max(DEVICE_COUNTS))
        )
        if not smoke:
            two = _run_two_processes(smoke, params_dir, device_env(2))
            result[TWO_PROCESS] = two["modes"]
            diff = max(
                v["max_abs_param_diff_vs_1x4"] for m in two["modes"].values() for v in m.values()
            )
            result["max_abs_2x2_vs_1x4_diff"] = diff
            result["identical_within_1e-5"] = result["identical_within_1e-5"] and diff <= 1e-5
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--two_process", default="", help="coordinator host:port")
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--params_dir", default="")
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args(argv)
    if a.two_process:
        result = two_process_child(a.smoke, a.two_process, a.process_id, a.params_dir)
        if a.process_id == 0:
            subprocess_util.emit(result)
        return
    if not a.child:
        parser.error("run through benchmarks.run, or with --child / --two_process")
    subprocess_util.emit(child(a.smoke, a.params_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
