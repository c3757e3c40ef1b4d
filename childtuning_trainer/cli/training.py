"""``childtuning-train``: fine-tunes a BERT/RoBERTa checkpoint on a task with vanilla AdamW,
ChildTuning-F or -D.

  childtuning-train --config=rte --config.mode=D --config.output_dir=runs/rte_D

``--config`` names a packaged configuration (cola, glue, mrpc, quickstart, rte, stsb) or a Python
file whose ``get_config()`` returns one; every setting can be overridden as ``--config.KEY=VALUE``
(``--help`` lists them). The data come from ``--config.data_dir``, else ``$CHILDTUNING_DATA_DIR``,
else the hub. The run writes checkpoints, ``metrics.jsonl`` and ``results.json`` to
``output_dir``; ``--config.resume=true`` continues from its newest checkpoint;
``--config.group_seeds=42,52,57`` trains a run per seed as one program (each in
``output_dir/seed_<seed>``). SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes a
checkpoint, prints the command that resumes the run and exits with 130 or 143. Bad input prints
one ``error: ...`` line (``--traceback`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from childtuning_trainer.cli import config_files
from childtuning_trainer.cli.usage import fail, help_asked, indented

FLAGS = flags.FLAGS
TRACEBACK_HELP = (
    "Show the Python traceback of bad configuration or data instead of one line "
    "(also CHILDTUNING_TRACEBACK=1)."
)


def define_flags(default_config: str) -> None:
    """``--config`` and ``--traceback`` (once per process)."""
    if "config" in FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", default_config, "A packaged configuration's name or a file.", lock_config=True
    )
    flags.DEFINE_bool(
        "traceback", os.environ.get("CHILDTUNING_TRACEBACK", "") not in ("", "0"), TRACEBACK_HELP
    )


def help_text(config_path: str) -> str:
    """``--help``: what the command does, its flags, and every setting with its default."""
    names = ", ".join(config_files.packaged_names())
    packaged = os.path.dirname(os.path.abspath(config_path)) == config_files.PACKAGED_DIR
    label = os.path.basename(config_path)[:-3] if packaged else config_path
    return "\n".join(
        [
            "usage: childtuning-train [--config=NAME|FILE] [--config.KEY=VALUE ...] [--traceback]",
            __doc__.split("\n\n", 1)[1].rstrip(),
            "",
            "flags:",
            f"  --config={config_files.DEFAULT}",
            *indented(f"a packaged configuration ({names}) or a Python file with get_config()"),
            "  --traceback=false",
            *indented(TRACEBACK_HELP),
            "  --helpfull",
            "      every flag, absl's included",
            "",
            f"settings of {label} (--config.KEY=VALUE; default shown):",
            config_files.settings_help(config_path),
        ]
    )


def checked_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--config`` resolved to its file; a missing file or an unknown
    ``--config.KEY`` ends the command with one error line; ``--help`` prints :func:`help_text`."""
    try:
        argv, path = config_files.resolve_argv(argv)
    except ValueError as e:
        fail(str(e))
    try:
        config = config_files.load(path)
    except Exception as e:  # the user's own file: one line naming it
        fail(f"--config={path}: {type(e).__name__}: {e}")
    if help_asked(argv):
        print(help_text(path))
        sys.exit(0)
    try:
        config_files.check_overrides(argv[1:], config)
    except ValueError as e:
        fail(str(e))
    return argv


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config = FLAGS.config
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        fail(f"config.output_dir={config.output_dir!r} is a file; name a folder.", status=1)
    from childtuning_trainer import (
        interruption,
        loop,
    )  # after the command line is checked: JAX starts here

    try:
        outcome = loop.train_and_evaluate(config)
    except interruption.Interrupted as e:  # SIGINT / SIGTERM: checkpointed, or a second signal
        print(e, file=sys.stderr)
        sys.exit(e.exit_status)
    except (ValueError, OSError) as e:  # bad configuration or data: one line, no traceback
        if FLAGS.traceback:
            raise
        fail(str(e), status=1)
    if outcome is None:
        print(f"Stopped after step {config.stop_after_steps}; resume to continue.")
        return
    for results, _ in outcome if isinstance(outcome, list) else [outcome]:  # group_seeds: each
        report(results)


def report(results: dict) -> None:
    """The run's summary and its dev metric against the trivial baseline."""
    if results.get("evaluation"):  # config.do_train=False
        print(
            json.dumps({k: results[k] for k in ("task", "model", "eval", "predictions")}, indent=2)
        )
        return
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


def run(argv: list[str] | None = None) -> None:
    """The ``childtuning-train`` entry."""
    argv = checked_argv(list(sys.argv if argv is None else argv))
    define_flags(config_files.config_path(config_files.DEFAULT))
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
