"""The installed commands (``pyproject.toml``'s ``[project.scripts]``): ``childtuning-train``
(:mod:`.training`), ``childtuning-sweep`` (:mod:`.sweeping`), ``childtuning-report``
(:mod:`.reporting`) and ``childtuning-launch`` (:mod:`.launching`), each module's ``run()``. The
repository's ``train.py``, ``sweep.py``, ``report.py`` and ``launch.py`` call the same entries.

The functions here are the console scripts' targets: without the ``train`` extra they end with one
line saying how to install it, not an ``ImportError``'s traceback."""

import importlib
import sys

EXTRA_MODULES = ("absl", "ml_collections")


def _run(module: str, command: str) -> None:
    try:
        for name in EXTRA_MODULES:
            importlib.import_module(name)
    except ImportError as e:
        print(
            f'error: {command} needs the train extra: pip install "childtuning-jax[train]" ({e})',
            file=sys.stderr,
        )
        sys.exit(1)
    importlib.import_module(f"childtuning_trainer.cli.{module}").run()


def train() -> None:
    _run("training", "childtuning-train")


def sweep() -> None:
    _run("sweeping", "childtuning-sweep")


def report() -> None:
    _run("reporting", "childtuning-report")


def launch() -> None:
    _run("launching", "childtuning-launch")
