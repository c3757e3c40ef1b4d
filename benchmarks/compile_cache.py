"""What JAX's persistent compilation cache saves a sweep: one short run, cold and warm.

A sweep (``sweep.py``) runs every configuration as its own ``train.py`` process, sharing the
persistent compilation cache, so a program another run already compiled is loaded from disk. This
benchmark runs the same short ChildTuning-D run (a seeded subset of RTE, one epoch, the packaged
MiniLM; tiny model in smoke runs) three times, each a fresh process: without the cache, with an
empty cache (it compiles and writes), and with the cache the second run filled. The run's wall
time, its training time (which includes the train step's compiles, one per bucket length) and its
Fisher time are recorded; warm against no cache is what a sweep saves per run of a configuration
it has compiled before. Needs the GLUE files (:data:`benchmarks.padding.GLUE_DIR`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from benchmarks.padding import GLUE_DIR, REPO, minilm, tiny_model
from childtuning_trainer.experiments import runner
from childtuning_trainer.experiments.store import RunSpec

CONTENDERS = ("no_cache", "cold_cache", "warm_cache")


def run(*, smoke: bool = False) -> dict[str, Any]:
    if not os.path.isdir(GLUE_DIR):
        return {"skipped": f"{GLUE_DIR} (the original GLUE files) is not present"}
    with tempfile.TemporaryDirectory(prefix="ctjax-cache-") as work:
        model = tiny_model(os.path.join(work, "tiny")) if smoke else minilm()
        spec = RunSpec.of(
            task="rte",
            mode="D",
            model=model,
            max_train_samples=16 if smoke else 128,
            max_eval_samples=16 if smoke else 64,
            max_seq_length=32 if smoke else 128,
            num_train_epochs=1,
            eval_every_epoch=False,
            save_model=False,
        )
        cache = os.path.join(work, "cache")
        out: dict[str, Any] = {"run": dict(spec.overrides) | {"model": os.path.basename(model)}}
        for i, name in enumerate(CONTENDERS):
            record = runner.run_one(
                spec,
                config_file="glue",
                train_script=os.path.join(REPO, "train.py"),
                settings={"data_dir": GLUE_DIR},
                results_file=os.path.join(work, f"results{i}.jsonl"),
                work_dir=os.path.join(work, f"work{i}"),
                cache_dir=None if name == "no_cache" else cache,
            )
            out[name] = {
                "wall_time_s": record["wall_time_s"],
                "train_time_s": record["train_time_s"],
                "fisher_time_s": record["fisher_time_s"],
                "eval": record["eval"],
            }
        out["cache_bytes"] = sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(cache)
            for f in files
        )
    out["saved_wall_s"] = out["no_cache"]["wall_time_s"] - out["warm_cache"]["wall_time_s"]
    out["warm_over_no_cache"] = out["warm_cache"]["wall_time_s"] / out["no_cache"]["wall_time_s"]
    out["same_metrics"] = len({json.dumps(out[c]["eval"], sort_keys=True) for c in CONTENDERS}) == 1
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
