"""Run-parallel training: N seeds of one ChildTuning-D run trained as one group, wall time per run.

Each group size is one fresh ``train.py --config.group_seeds=...`` process
(:mod:`childtuning_trainer.group_loop`) without the persistent compilation cache, so its wall time
includes every compile. Recorded per size: the process's wall time and wall time per run, the
group's training and Fisher times, its compiled programs and peak device memory. On a CPU the
target compares a group of 3 seeds with the same 3 runs each alone (their training times summed,
and their last epoch's, when every program is compiled): the group's last epoch should cost no
more than 1.1 times as much.

``python -m benchmarks.run_parallel`` (GPU: ``--sizes=1,10,30``, full RTE, 3 epochs, the packaged
MiniLM; ``--budget-s`` stops before a size that would not fit the time left) writes its record
to ``benchmarks/results`` and rebuilds ``RESULTS.md``; the CPU suite
(``python -m benchmarks.run --only run_parallel``) and its smoke test run it small. Needs
``../shared/glue``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import records
from benchmarks.padding import GLUE_DIR, REPO, minilm, tiny_model
from childtuning_trainer.experiments import group_runner, runner

SMOKE = dict(max_train_samples=16, max_eval_samples=8, max_seq_length=32, num_train_epochs=2)
CPU = dict(max_train_samples=64, max_eval_samples=32, max_seq_length=64, num_train_epochs=2)
GPU = dict(max_train_samples=0, max_eval_samples=0, max_seq_length=128, num_train_epochs=3)
CPU_TARGET = 1.1  # a group of 3 seeds against 3 runs alone (training time), on the CPU


def train(output_dir: str, settings: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """One ``train.py`` process (a group when several seeds): its wall time and first run's
    results."""
    flags = {
        **settings,
        "output_dir": output_dir,
        "compilation_cache_dir": "none",  # every compile counted
        "tensorboard": False,
        "save_model": False,
        "eval_every_epoch": False,
    }
    if len(seeds) > 1:
        flags["group_seeds"] = ",".join(map(str, seeds))
    else:
        flags["seed"] = seeds[0]
    command = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/glue.py"]
    command += [f"--config.{k}={runner.flag_value(v)}" for k, v in flags.items()]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"train.py failed: {(proc.stderr or proc.stdout)[-500:]}")
    first = output_dir if len(seeds) == 1 else os.path.join(output_dir, f"seed_{seeds[0]}")
    with open(os.path.join(first, "results.json")) as f:
        results = json.load(f)
    keys = ("train_time_s", "fisher_time_s", "eval_time_s", "compiled_programs")
    return {
        "wall_time_s": wall,
        "wall_per_run_s": wall / len(seeds),
        **{k: results.get(k) for k in keys},
        "last_epoch_train_s": results["epoch_train_time_s"][-1],  # compiled by then
        "peak_device_memory_bytes": results.get("peak_device_memory_bytes"),
        "eval": results["eval"],
    }


def run(
    *,
    smoke: bool = False,
    sizes: tuple[int, ...] | None = None,
    budget_s: float | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """``{label: {"sizes": {N: ...}, "cpu_target": ...}}`` (see the module docstring); ``full``:
    the GPU shape (full RTE, 3 epochs) and no CPU target."""
    if not os.path.isdir(GLUE_DIR):
        return {"skipped": f"{GLUE_DIR} (the original GLUE files) is not present"}
    shape = SMOKE if smoke else GPU if full else CPU
    sizes = sizes or (1, 3)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctjax-groups-") as work:
        model = tiny_model(os.path.join(work, "tiny")) if smoke else minilm()
        name = "tiny" if smoke else "all-MiniLM-L6-v2"
        settings = dict(shape, task="rte", mode="D", model=model, data_dir=GLUE_DIR)
        out: dict[str, Any] = {"run": {**shape, "model": name}, "sizes": {}}
        for n in sizes:
            spent = time.perf_counter() - start
            last = max(out["sizes"].values(), key=lambda r: r["wall_time_s"], default=None)
            if budget_s is not None and last and spent + 2 * last["wall_time_s"] > budget_s:
                out["sizes"][str(n)] = {"skipped": f"time box: {spent:.0f} of {budget_s:.0f} s"}
                continue
            seeds = [42 + i for i in range(n)]
            out["sizes"][str(n)] = train(os.path.join(work, f"group{n}"), settings, seeds)
        if not full:
            seeds = [42, 43, 44]  # size 1 is seed 42 alone
            alone = [out["sizes"].get("1") or train(os.path.join(work, "a42"), settings, [42])]
            alone += [train(os.path.join(work, f"alone{s}"), settings, [s]) for s in seeds[1:]]
            group = out["sizes"].get("3") or train(os.path.join(work, "group3"), settings, seeds)
            summed = sum(a["train_time_s"] for a in alone)
            steady = sum(a["last_epoch_train_s"] for a in alone)
            out["cpu_target"] = {
                "group_of_3_train_s": group["train_time_s"],
                "three_alone_train_s": summed,
                "ratio": group["train_time_s"] / summed,
                # The last epoch: every program compiled, the step's own cost.
                "group_of_3_last_epoch_s": group["last_epoch_train_s"],
                "three_alone_last_epoch_s": steady,
                "last_epoch_ratio": group["last_epoch_train_s"] / steady,
                "target": CPU_TARGET,
                "met": group["last_epoch_train_s"] <= CPU_TARGET * steady,
            }
    return {f"{name} rte D": out}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,30", help="runs per group, comma-separated")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time box (seconds)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data (CPU test)")
    parser.add_argument("--out", default=records.HERE, help="where results/ and RESULTS.md are")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    platform, _ = group_runner.device_memory()  # asked of a subprocess: this one holds no device
    suite = ("cpu" if platform in ("cpu", "unknown") else "gpu") + ("-smoke" if args.smoke else "")
    record = records.new_record(suite, argv)
    record["command"] = " ".join(["python -m benchmarks.run_parallel", *argv])
    result = run(smoke=args.smoke, sizes=sizes, budget_s=args.budget_s, full=not args.smoke)
    record.update(results={"run_parallel": result}, complete=True)
    record["load_end"] = list(os.getloadavg())
    print(json.dumps(records.write_outputs(record, args.out, plots=False), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
