"""One process of the multi-host tests: several runs in turn, one ``jax.distributed`` session.

  python launch.py --script=tools/multihost_worker.py -- \
      --config=childtuning_trainer/configs/glue.py ... \
      --runs=vanilla:pmap,F:pmap,D:pmap,D:jit

Run ``mode:parallelism`` writes to ``output_dir/<mode>_<parallelism>`` (process 0, as
``train.py``); every process also writes ``digest_<process>.json`` there: a hash of the final
params, so a test can check that every process ends with the same ones.
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from childtuning_trainer import loop
from childtuning_trainer.cli import config_files

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_files.config_path(config_files.DEFAULT), "Base configuration (a file)."
)
_RUNS = flags.DEFINE_list(
    "runs", ["D:pmap"], "mode:parallelism pairs (mode:parallelism:flat: the flat chain), in turn."
)


def digest(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> None:
    del argv
    base = _CONFIG.value
    for run in _RUNS.value:
        mode, parallelism, *flat = run.split(":")
        config = base.copy_and_resolve_references()
        config.mode, config.parallelism = mode, parallelism
        if flat:  # params held flat, as on an accelerator
            config.flat_update = True
        name = "_".join([mode, parallelism, *flat])
        config.output_dir = os.path.join(base.output_dir, name)
        _, params = loop.train_and_evaluate(config)
        path = os.path.join(config.output_dir, f"digest_{jax.process_index()}.json")
        with open(path, "w") as f:
            json.dump({"params": digest(params), "processes": jax.process_count()}, f)


if __name__ == "__main__":
    app.run(main)
