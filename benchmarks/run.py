"""The benchmark suite's single entry point: ``python -m benchmarks.run`` (``make bench``).

Runs every benchmark (or ``--only`` some), writes the raw numbers to
``<out>/results/<stamp>-<suite>.json``, rebuilds ``<out>/RESULTS.md`` from all the records there
(:mod:`benchmarks.results_table`) and redraws the plots next to it. ``--smoke`` runs tiny
versions of everything (the CI test uses it) and writes to a temporary directory unless ``--out``
is given. ``--gpu`` runs the GPU profile instead (see
:mod:`benchmarks.gpu_profile`).

Benchmarks (see each module's docstring):

* ``train_step`` -- ours (jit) vs the official PyTorch recipe, vanilla / F / D;
* ``fisher_pass`` -- Fisher information pass vs a training epoch's forward + backward;
* ``mask_selection`` -- ``fisher_mask`` vs the official ``np.append`` + ``np.percentile``;
* ``optimizer_update`` -- ``chain(child_tuning_{f,d}, adamw)`` vs ``adamw``;
* ``update_alone`` -- the trainer's update per leaf vs flat, against the bandwidth limit;
* ``memory`` -- peak host memory of D and F runs vs vanilla (subprocesses);
* ``pmap_scaling`` -- the trainer's pmapped step over 1, 2, 4 host devices (subprocess);
* ``padding`` -- trainer epochs with length-bucketed padding vs padding to ``max_seq_length``;
* ``compile_cache`` -- one short run without, with a cold and with a warm compilation cache;
* ``run_parallel`` -- seeds trained as one run group against runs alone (wall time per run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHMARKS = (
    "mask_selection",
    "optimizer_update",
    "update_alone",
    "train_step",
    "fisher_pass",
    "memory",
    "pmap_scaling",
    "padding",
    "compile_cache",
    "run_parallel",
)
CPU_THREADS = 2


def cpu_suite(
    smoke: bool, train_rounds: int | None = None, padding_tasks: tuple[str, ...] | None = None
) -> dict[str, Callable[[], Any]]:
    """The CPU suite: benchmark name -> thunk returning its results (``train_rounds``: rounds of
    the train-step benchmark, default 3; ``padding_tasks``: the padding benchmark's tasks, default
    all four)."""
    from benchmarks import (
        common,
        compile_cache,
        fisher_pass,
        mask_selection,
        memory,
        optimizer_update,
        padding,
        pmap_scaling,
        run_parallel,
        train_step,
        update_alone,
    )

    shape = common.BERT_TINY if smoke else common.BERT_BASE
    label = f"{shape.name}/float32"
    threads = None if smoke else min(CPU_THREADS, os.cpu_count() or 1)
    return {
        "mask_selection": lambda: mask_selection.run(smoke=smoke),
        "optimizer_update": lambda: {shape.name: optimizer_update.run(smoke=smoke)},
        "update_alone": lambda: {shape.name: update_alone.run(smoke=smoke)},
        "train_step": lambda: {
            label: train_step.run(smoke=smoke, threads=threads, rounds=train_rounds)
        },
        "fisher_pass": lambda: {label: fisher_pass.run(smoke=smoke)},
        "memory": lambda: memory.run(
            smoke=smoke, modes=("vanilla", "D") if smoke else ("vanilla", "D", "F")
        ),
        "pmap_scaling": lambda: pmap_scaling.run(smoke=smoke),
        "padding": lambda: padding.run(smoke=smoke, tasks=padding_tasks or padding.TASKS),
        "compile_cache": lambda: compile_cache.run(smoke=smoke),
        "run_parallel": lambda: run_parallel.run(smoke=smoke),
    }


def run_suite(
    thunks: dict[str, Callable[[], Any]],
    only: list[str] | None,
    *,
    background: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Runs the selected thunks; a failing benchmark is recorded, not fatal to the others.

    ``background`` benchmarks (subprocess ones, in smoke runs where timings do not matter) start
    at once on a thread and are collected in their turn.
    """
    from benchmarks import common

    selected = {name: thunk for name, thunk in thunks.items() if not only or name in only}
    pool = ThreadPoolExecutor(max_workers=max(len(background), 1))
    futures = {name: pool.submit(selected[name]) for name in background if name in selected}
    results: dict[str, Any] = {}
    errors: list[str] = []
    for name, thunk in selected.items():
        print(f"[benchmarks] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            results[name] = futures[name].result() if name in futures else thunk()
        except Exception as exc:  # noqa: BLE001 - record and go on with the others
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            errors.append(name)
        print(f"[benchmarks] {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        common.reset_peak_rss()  # gc and return freed heap to the OS before the next one
    pool.shutdown()
    return results, errors


@contextlib.contextmanager
def shared_compilation_cache() -> Iterator[None]:
    """A persistent XLA compilation cache for this run and its subprocesses.

    The memory subprocesses compile the same train and Fisher steps that the train-step and
    Fisher benchmarks compiled before them; sharing the executables saves minutes. A cache that
    is already configured (``JAX_COMPILATION_CACHE_DIR``, e.g. by the tests) is used as is;
    otherwise a fresh temporary one, so the first-call (compile) times reported are real
    compiles.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ctjax-bench-cache-") as directory:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        try:
            yield
        finally:
            os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
            jax.config.update("jax_compilation_cache_dir", None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="Run the childtuning-jax benchmark suite.")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CI (< 1 min)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU profile instead")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument("--out", default=None, help="where RESULTS.md, results/ and plots go")
    parser.add_argument("--budget-s", type=float, default=300.0, help="GPU profile time box")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--train-rounds",
        type=int,
        default=None,
        help="rounds of the CPU train-step benchmark (default 3; each costs about 75 s on 2 cores)",
    )
    parser.add_argument(
        "--padding-tasks",
        default="",
        help="comma-separated tasks of the padding benchmark (default cola,stsb,mrpc,rte)",
    )
    args = parser.parse_args(argv)
    if args.train_rounds is not None and args.train_rounds < 1:
        parser.error(f"--train-rounds must be >= 1, got {args.train_rounds}")
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    padding_tasks = tuple(t for t in args.padding_tasks.split(",") if t) or None
    if padding_tasks:
        from benchmarks.padding import TASKS

        if not set(padding_tasks) <= set(TASKS):
            parser.error(
                f"--padding-tasks: choose from {','.join(TASKS)}; got {args.padding_tasks}"
            )
    out_dir = args.out or (tempfile.mkdtemp(prefix="ctjax-bench-") if args.smoke else records.HERE)

    if args.gpu:
        from benchmarks import gpu_profile

        return gpu_profile.main(
            (["--smoke"] if args.smoke else [])
            + ["--out", out_dir, "--budget-s", str(args.budget_s)]
            + (["--only", args.only] if args.only else [])
            + (["--no-plots"] if args.no_plots else []),
            command=" ".join(["python -m benchmarks.run", *map(shlex.quote, argv)]),
        )

    record = records.new_record("smoke" if args.smoke else "cpu", argv)
    start = time.perf_counter()
    with shared_compilation_cache():
        background = (
            ("memory", "pmap_scaling", "compile_cache", "run_parallel") if args.smoke else ()
        )
        results, errors = run_suite(
            cpu_suite(args.smoke, args.train_rounds, padding_tasks),
            only,
            background=background,
        )
    record.update(
        results=results, duration_s=time.perf_counter() - start, load_end=list(os.getloadavg())
    )
    records.add_training_throughput(results)
    written = records.write_outputs(record, out_dir, plots=not args.no_plots)
    for key, path in written.items():
        print(f"[benchmarks] wrote {key}: {path}")
    if errors:
        print(f"[benchmarks] FAILED: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
