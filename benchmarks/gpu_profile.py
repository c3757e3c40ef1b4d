"""GPU profile: items 1-3 of the suite on one accelerator, BERT-base and BERT-large, float32 and
bfloat16, time-boxed (default 5 minutes), writing the same JSON and RESULTS.md rows as the CPU
suite (suite ``gpu``).

    python -m benchmarks.gpu_profile            # or: python -m benchmarks.run --gpu
    python -m benchmarks.gpu_profile --smoke    # tiny shapes; runs anywhere, CPU included

Tasks run in priority order (BERT-base first); a task that would start with less than its
minimum time left is skipped and listed as such, and a task still running at the deadline is
interrupted (``SIGALRM``) and recorded as stopped. The JSON is rewritten after every task
(``"complete": false`` until the end), so a profile killed from outside keeps what it finished.
``SIGALRM`` reaches Python only between native calls: an XLA compile in flight at the deadline
finishes first, so give an outer time limit about two minutes above ``--budget-s``.

Compiling dominates on a GPU: on an H200 (2026-11-27) the first call of our BERT-base train step
took 19-28 s (vanilla, D) and 43-46 s (F), so the 5-minute default covers the BERT-base train
steps and little more; ``--only`` (names or ``name[label]``) splits the plan over several calls.

bfloat16 means bfloat16 compute with float32 parameters and optimizer
state: ``from_config(dtype=jnp.bfloat16)`` for ours, ``torch.autocast(bfloat16)`` for PyTorch.
The PyTorch baseline runs where ``torch.cuda.is_available()``; otherwise ours runs alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks import records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TimeBoxExceeded(Exception):
    """Raised inside the running task when the profile's budget is spent."""


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise TimeBoxExceeded("time budget spent")


def plan(smoke: bool) -> list[tuple[str, str, float, Callable[[], Any]]]:
    """(benchmark, config label, minimum seconds left to start it, thunk), in priority order.

    On GPU: batch 32 x 128 (8 x 128 is launch-bound there), 5 rounds; the optimizer update in 50
    rounds (an update takes milliseconds, so 10 rounds are noisy), without the F
    ``jax.random.bernoulli`` variant (its compile would cost the time box more than it tells).
    """
    import jax.numpy as jnp

    from benchmarks import (
        common,
        fisher_pass,
        mask_selection,
        optimizer_update,
        train_step,
        update_alone,
    )

    torch_device = None
    try:
        import torch

        if torch.cuda.is_available():
            torch_device = "cuda"
    except ImportError:
        pass

    if smoke:
        base, large = (
            common.BERT_TINY,
            common.BertShape("bert-tiny-2L", 32, 2, 64, vocab=128, max_position=64, dropout=0.0),
        )
        batch, seq, rounds, fisher_batches = 2, 16, 2, 2
    else:
        base, large = common.BERT_BASE, common.BERT_LARGE
        batch, seq, rounds, fisher_batches = 32, 128, 5, 4
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

    def train(shape, dtype_name):
        return lambda: train_step.run(
            shape=shape,
            batch_size=batch,
            seq_len=seq,
            rounds=rounds,
            dtype=dtypes[dtype_name],
            with_torch=torch_device is not None,
            torch_device=torch_device or "cpu",
        )

    def fisher(shape, dtype_name):
        return lambda: fisher_pass.run(
            shape=shape,
            num_batches=fisher_batches,
            batch_size=batch,
            seq_len=seq,
            rounds=3,
            dtype=dtypes[dtype_name],
        )

    def mask(shape):
        return lambda: mask_selection.measure(shape, rounds=3, reference_rounds=1)

    def optimizer(shape):
        return lambda: optimizer_update.run(
            smoke=smoke, shape=shape, rounds=None if smoke else 50, bernoulli_rounds=0
        )

    b, lg = base.name, large.name
    tasks = [
        ("train_step", f"{b}/float32", 45, train(base, "float32")),
        ("train_step", f"{b}/bfloat16", 45, train(base, "bfloat16")),
        ("optimizer_update", b, 15, optimizer(base)),
        (
            "update_alone",
            b,
            20,
            lambda: update_alone.run(smoke=smoke, rounds=None if smoke else 50),
        ),
        ("mask_selection", b, 20, mask(base)),
        ("fisher_pass", f"{b}/float32", 40, fisher(base, "float32")),
        ("train_step", f"{lg}/float32", 60, train(large, "float32")),
        ("train_step", f"{lg}/bfloat16", 60, train(large, "bfloat16")),
        ("mask_selection", lg, 30, mask(large)),
        ("optimizer_update", lg, 20, optimizer(large)),
        ("fisher_pass", f"{b}/bfloat16", 40, fisher(base, "bfloat16")),
        ("fisher_pass", f"{lg}/float32", 60, fisher(large, "float32")),
        ("fisher_pass", f"{lg}/bfloat16", 60, fisher(large, "bfloat16")),
    ]
    if smoke:  # tiny shapes need a tenth of the time
        tasks = [(bench, label, min_left / 10, thunk) for bench, label, min_left, thunk in tasks]
    return tasks


def run_profile(
    budget_s: float,
    smoke: bool,
    only: list[str],
    on_progress: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Runs the plan within ``budget_s``; returns (results like the CPU suite's, skipped).

    ``on_progress(results, skipped)`` runs after each task (the CLI rewrites its JSON there, so a
    profile killed from outside keeps every finished task)."""
    deadline = time.monotonic() + budget_s
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for bench, label, min_left, thunk in plan(smoke):
            name = f"{bench} [{label}]"
            if only and bench not in only and f"{bench}[{label}]" not in only:
                continue
            left = deadline - time.monotonic()
            if left < min_left:
                skipped[name] = f"time box: {left:.0f} s left, needs >= {min_left} s"
                continue
            print(f"[gpu_profile] {name} ({left:.0f} s left) ...", flush=True)
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
            try:
                value = thunk()
            except TimeBoxExceeded:
                value = {"error": "stopped: time budget spent while running"}
            except Exception as exc:  # noqa: BLE001 - record, go on
                traceback.print_exc()
                value = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            if bench == "mask_selection":
                results.setdefault(bench, {"main": {}}).setdefault("main", {})[label] = value
                if "error" in value:
                    results[bench]["main"].pop(label)
                    results[bench].setdefault("errors", {})[label] = value["error"]
            else:
                results.setdefault(bench, {})[label] = value
            if on_progress is not None:
                on_progress(results, skipped)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return results, skipped


def main(argv: list[str] | None = None, *, command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (tests it on CPU)")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated benchmarks: name or name[label], e.g. train_step[bert-large/float32]",
    )
    parser.add_argument("--out", default=None, help="output directory (default: benchmarks/)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    import jax

    if jax.default_backend() == "cpu" and not args.smoke:
        print("[gpu_profile] warning: no accelerator found, profiling the CPU", file=sys.stderr)
    out_dir = args.out or records.HERE
    suite_name = "gpu-smoke" if args.smoke else "gpu"
    record = records.new_record(suite_name, argv)
    record["command"] = command or " ".join(
        ["python -m benchmarks.gpu_profile", *map(shlex.quote, argv)]
    )
    record["budget_s"] = args.budget_s
    start = time.perf_counter()

    def save_partial(results: dict[str, Any], skipped: dict[str, str]) -> None:
        partial = dict(record, results=results, skipped=skipped, complete=False)
        partial["duration_s"] = time.perf_counter() - start
        partial["load_end"] = list(os.getloadavg())
        records.write_json(partial, out_dir)

    results, skipped = run_profile(
        args.budget_s, args.smoke, [n for n in args.only.split(",") if n], save_partial
    )
    records.add_training_throughput(results)
    record.update(
        results=results,
        skipped=skipped,
        complete=True,
        duration_s=time.perf_counter() - start,
        load_end=list(os.getloadavg()),
    )
    written = records.write_outputs(record, out_dir, plots=not args.no_plots)
    for key, path in written.items():
        print(f"[gpu_profile] wrote {key}: {path}")
    failed = [
        f"{bench} [{label}]"
        for bench, by_label in results.items()
        for label, value in by_label.items()
        if isinstance(value, dict) and "error" in value and "time budget" not in value["error"]
    ]
    failed += [f"mask_selection [{k}]" for k in results.get("mask_selection", {}).get("errors", {})]
    if failed:
        print(f"[gpu_profile] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
