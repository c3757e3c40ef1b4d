"""Fine-tunes a BERT/RoBERTa checkpoint on a GLUE task with vanilla AdamW, ChildTuning-F or -D.

  python train.py --config=configs/rte.py --config.mode=D \
      --config.data_dir=../shared/glue --config.output_dir=runs/rte_D

Every key of the configuration (see configs/glue.py) can be overridden as ``--config.KEY=VALUE``.
The run writes checkpoints, ``metrics.jsonl``, ``results.json`` (and for ChildTuning-D
``mask_summary.json``) to ``output_dir``; ``--config.resume=true`` continues from its newest
checkpoint; ``--config.group_seeds=42,52,57`` trains a run per seed as one program (each in
``output_dir/seed_<seed>``). Bad configuration or data prints one ``error: ...`` line and exits
with status 1 (``--traceback`` shows the traceback).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from childtuning_trainer import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/glue.py", "Training configuration (a configs/*.py file).", lock_config=True
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback",
    os.environ.get("CHILDTUNING_TRACEBACK", "") not in ("", "0"),
    "Show the Python traceback of bad configuration or data instead of one line "
    "(also CHILDTUNING_TRACEBACK=1).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        outcome = loop.train_and_evaluate(_CONFIG.value)
    except (ValueError, OSError) as e:  # bad configuration or data: one line, no traceback
        if _TRACEBACK.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if outcome is None:
        print(f"Stopped after step {_CONFIG.value.stop_after_steps}; resume to continue.")
        return
    for results, _ in outcome if isinstance(outcome, list) else [outcome]:  # group_seeds: each
        report(results)


def report(results: dict) -> None:
    """The run's summary and its dev metric against the trivial baseline."""
    summary = {k: results[k] for k in ("task", "mode", "reserve_p", "steps", "eval", "best")}
    summary.update({k: round(results[k], 1) for k in ("train_time_s", "eval_time_s")})
    if results["fisher_time_s"] is not None:
        summary["fisher_time_s"] = round(results["fisher_time_s"], 1)
    print(json.dumps(summary, indent=2))
    metric = results["best"]["metric"]
    baseline = results["baseline"]
    print(
        f"dev {metric} {results['eval'][metric]:.4f} after {results['epochs']} epoch(s); "
        f"{baseline['eval'][metric]:.4f} for {baseline['predictor']}"
    )


if __name__ == "__main__":
    app.run(main)
