"""Runs a list of training runs one after another, resumably.

Each run is ``childtuning-train`` in its own process with ``--config.resume=true`` in its own work
folder, so an interrupted sweep continues where it stopped: finished runs (those with a line in the
results file, :mod:`.store`) are skipped, an unfinished one resumes from its newest checkpoint.
The processes share JAX's persistent compilation cache, so a program compiled for one run (same
shapes, same settings) is loaded, not compiled again, by the next. Several sweeps may work through
the same runs at once (say one per core): a run is trained by whichever sweep takes its lock file
first. When a block of runs (a sweep command) has finished, :func:`commit_results` commits its
records and report.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from childtuning_trainer.experiments import store
from childtuning_trainer.experiments.store import RunSpec

CACHE_DIR = ".jax_cache"
FISHER_CACHE_DIR = "runs/fisher_cache"
TRAIN_MODULE = "childtuning_trainer.cli.training"  # what childtuning-train runs


def flag_value(value: Any) -> str:
    """A config value as ``--config.KEY=`` text that ml_collections parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def train_command(
    spec: RunSpec,
    config_file: str,
    output_dir: str,
    settings: dict[str, Any],
    train_script: str = TRAIN_MODULE,
) -> list[str]:
    """``spec``'s training command; ``settings`` (e.g. ``data_dir``) do not name the run.
    ``train_script``: a module (run with ``-m``) or a ``.py`` file."""
    flags = {**dict(spec.overrides), **settings, "output_dir": output_dir, "resume": True}
    program = [train_script] if train_script.endswith(".py") else ["-m", train_script]
    return [
        sys.executable,
        *program,
        f"--config={config_file}",
        *(f"--config.{key}={flag_value(value)}" for key, value in flags.items()),
    ]


def compilation_cache_env(cache_dir: str = CACHE_DIR) -> dict[str, str]:
    """Environment for a JAX process that reads and writes the persistent compilation cache."""
    return {
        "JAX_COMPILATION_CACHE_DIR": os.path.abspath(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def logged_train_losses(output_dir: str) -> list[dict[str, Any]]:
    """The training-loss lines of a run's ``metrics.jsonl`` (step, epoch, mean loss since the
    previous line), in order; empty if the run logged none."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [{k: line[k] for k in ("step", "epoch", "loss")} for line in lines if "loss" in line]


def run_logged(command: list[str], log_path: str, cache_dir: str) -> tuple[int, float]:
    """Runs ``command`` (with the compilation cache in ``cache_dir``, if any), appending its
    output to ``log_path``; returns its exit status and wall time in seconds."""
    env = {**os.environ, **(compilation_cache_env(cache_dir) if cache_dir else {})}
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc.returncode, time.perf_counter() - start


def run_one(
    spec: RunSpec,
    *,
    config_file: str = "glue",
    settings: dict[str, Any] | None = None,
    results_file: str = store.RESULTS_FILE,
    work_dir: str = store.WORK_DIR,
    cache_dir: str | None = CACHE_DIR,
    keep_checkpoints: bool = False,
    train_script: str = TRAIN_MODULE,
    data_dirs: Mapping[str, str] | None = None,
) -> dict:
    """Trains ``spec`` (or resumes it) unless it has finished; returns its result record.

    ``data_dirs`` (task -> ``data_dir``) overrides ``settings``' ``data_dir`` for the tasks it
    names, e.g. the hub for a task the local data folder does not hold.

    The record is the run's ``results.json`` with the run id, overrides, command, wall time and
    logged training losses, appended to ``results_file``.
    Once it is saved the run's checkpoints are deleted (unless ``keep_checkpoints``); its
    ``model/``, predictions, logs and ``results.json`` stay in its work folder.

    Raises:
      RuntimeError: the run failed (its last error line and the log file are named).
    """
    done = store.load_result(spec, results_file)
    if done is not None:
        return done
    output_dir = os.path.join(work_dir, spec.run_id)
    os.makedirs(output_dir, exist_ok=True)
    settings = dict(settings or {})
    if data_dirs and spec.get("task") in data_dirs:
        settings["data_dir"] = data_dirs[spec.get("task")]
    command = train_command(spec, config_file, output_dir, settings, train_script)
    log_path = os.path.join(output_dir, "log.txt")
    returncode, wall = run_logged(command, log_path, cache_dir)
    if returncode != 0:
        raise RuntimeError(f"run {spec.run_id} failed ({last_error(log_path)}); see {log_path}")
    return record_finished(spec, output_dir, command, wall, results_file, keep_checkpoints)


def last_error(log_path: str) -> str:
    """A failed run's last ``error:`` line (else its last line) in its log."""
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")] or lines[-1:]
    return errors[-1] if errors else "?"


def record_finished(
    spec: RunSpec,
    output_dir: str,
    command: list[str],
    wall: float,
    results_file: str = store.RESULTS_FILE,
    keep_checkpoints: bool = False,
) -> dict:
    """Records the finished run of ``output_dir`` (see :func:`run_one`); returns the record."""
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    record = {
        **results,
        "run_id": spec.run_id,
        "overrides": dict(spec.overrides),
        "command": shlex.join(["python", *command[1:]]),
        "wall_time_s": wall,
        "train_loss": logged_train_losses(output_dir),
        # XLA's CPU results depend (at float rounding) on how many cores the process may use.
        "cpu_cores": len(os.sched_getaffinity(0)),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    store.save_result(spec, record, results_file)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(output_dir, "checkpoints"), ignore_errors=True)
    return record


@contextlib.contextmanager
def run_lock(name: str, work_dir: str = store.WORK_DIR) -> Iterator[bool]:
    """Holds the lock file ``<work_dir>/<name>.lock`` while the block runs; yields False if another
    process holds it.

    An ``flock`` lock: the operating system releases it when its holder exits, however it exits.
    """
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, f"{name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_all(
    specs: Sequence[RunSpec],
    *,
    on_result: Callable[[], None] | None = None,
    **kwargs: Any,
) -> tuple[list[dict], list[str]]:
    """Runs every spec in order (finished ones are skipped); a failed run is reported and the sweep
    goes on. ``on_result`` is called after each newly finished run (e.g. to refresh the report).

    Returns the records of the finished runs and the error lines of the failed ones.
    """
    records, failures = [], []
    done = store.recorded(kwargs.get("results_file", store.RESULTS_FILE))
    for i, spec in enumerate(specs, 1):
        if spec.run_id in done:
            records.append(done[spec.run_id])
            continue
        with run_lock(spec.run_id, kwargs.get("work_dir", store.WORK_DIR)) as mine:
            if not mine:
                print(f"[{i}/{len(specs)}] {spec.run_id}: another sweep is training it", flush=True)
                continue
            print(f"[{i}/{len(specs)}] {spec.run_id}", flush=True)
            try:
                record = run_one(spec, **kwargs)
            except RuntimeError as e:
                print(f"  failed: {e}", flush=True)
                failures.append(str(e))
                continue
        records.append(record)
        print(f"  done in {record['wall_time_s']:.0f}s: {record['eval']}", flush=True)
        if on_result is not None:
            on_result()
    return records, failures


def commit_results(
    name: str, message: str, reports_dir: str = store.REPORTS_DIR, work_dir: str = store.WORK_DIR
) -> bool:
    """Commits the results files and protocol ``name``'s report folder, when they changed, in the
    git repository that holds them (followed through links, so a worker started from a copy of
    the tree commits to the original); returns whether it committed. Sweeps call it once a block
    has finished, not after each run; concurrent sweeps take turns (a lock file)."""
    real = os.path.realpath(reports_dir)
    names = (store.RESULTS_NAME, store.PROBES_NAME, name)
    paths = [os.path.join(real, p) for p in names if os.path.exists(os.path.join(real, p))]
    git = ["git", "-C", real]
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, "git-commit.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another sweep commits
        subprocess.run([*git, "add", "--", *paths], check=True)
        if subprocess.run([*git, "diff", "--cached", "--quiet", "--", *paths]).returncode == 0:
            return False
        subprocess.run([*git, "commit", "-q", "-m", message, "--", *paths], check=True)
    return True
