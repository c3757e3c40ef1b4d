"""The train step at the accelerator's limit (issue 29), on one GPU, time-boxed, in one command:

    python -m benchmarks.gpu_step --out DIR            # or: tools/gpu_bench.sh DIR
    python -m benchmarks.gpu_step --out DIR --smoke    # tiny shapes; runs anywhere, CPU included

Sections, in priority order (``DIR/gpu_step-<stamp>.json`` is rewritten after each one, so a run
stopped from outside keeps what it finished; a section that would start with less than its
minimum time left is skipped and listed):

* ``step``: BERT-base, batch 32 x 128, random weights, clip -> Child-Tuning -> AdamW, per mode
  (vanilla / F / D) and dtype (float32 / bfloat16), ours (the trainer's step and chain, the flat
  chain where this checkout has it) against PyTorch (:mod:`benchmarks.torch_foreach`);
* ``update``: the optimizer update alone (per leaf, flat) against the HBM limit
  (:mod:`benchmarks.step_parts`);
* ``mfu``: vanilla at batch 32 and 128 x 128, FLOPs of forward and backward over the time and
  the chip's peak;
* ``trainer``: the trainer's steady state, MiniLM-shaped (random weights) on RTE's shape
  16 x 128, metrics fetched every 50 steps against every step.

Our steps of one section compile in parallel threads (XLA compiles outside the GIL); the times are
seconds per step over a run of steps with one wait at the end (dispatch overlaps), medians of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGET_S = 420.0  # inside the 8 minutes of a device call, with room to start and write
SECTIONS = ("step", "update", "mfu", "trainer")
MIN_LEFT_S = {"step": 60, "update": 20, "mfu": 40, "trainer": 30}


class TimeBoxExceeded(Exception):
    """Raised inside the running section when the budget is spent."""


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise TimeBoxExceeded("time budget spent")


def _sizes(smoke: bool) -> dict[str, Any]:
    from benchmarks import common

    if smoke:
        tiny = common.BERT_TINY
        return dict(shape=tiny, minilm=tiny, batch=2, big_batch=4, seq=16, steps=2, repeats=1)
    minilm = common.BertShape("minilm-l12-h384", hidden=384, layers=12, intermediate=1536)
    return dict(
        shape=common.BERT_BASE, minilm=minilm, batch=32, big_batch=128, seq=128, steps=20, repeats=3
    )


def run_sections(
    smoke: bool,
    budget_s: float,
    only: tuple[str, ...],
    flat: bool | None,
    on_progress: Callable[[dict, dict], None],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Runs the sections within ``budget_s``; returns (results, skipped)."""
    from benchmarks import step_parts

    sizes = _sizes(smoke)
    torch_device = step_parts.torch_device()
    thunks = {
        "step": lambda: step_parts.step_section(
            sizes, flat=flat, torch_device=torch_device, smoke=smoke
        ),
        "update": lambda: step_parts.update_section(sizes, flat=flat),
        "mfu": lambda: step_parts.mfu_section(sizes, flat=flat),
        "trainer": lambda: step_parts.trainer_section(sizes, flat=flat),
    }
    deadline = time.monotonic() + budget_s
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    use_alarm = hasattr(signal, "SIGALRM")
    previous = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    try:
        for name in SECTIONS:
            if only and name not in only:
                continue
            left = deadline - time.monotonic()
            need = MIN_LEFT_S[name] / (10 if smoke else 1)
            if left < need:
                skipped[name] = f"time box: {left:.0f} s left, needs >= {need:.0f} s"
                continue
            print(f"[gpu_step] {name} ({left:.0f} s left) ...", flush=True)
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
            try:
                results[name] = thunks[name]()
            except TimeBoxExceeded:
                results[name] = {"error": "stopped: time budget spent while running"}
            except Exception as exc:  # noqa: BLE001 - record, go on
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            on_progress(results, skipped)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return results, skipped


def write_record(record: dict[str, Any], out_dir: str) -> str:
    """Writes (or rewrites) ``out_dir/gpu_step-<stamp>.json`` atomically; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"gpu_step-{record['stamp']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (tests it on CPU)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--only", default="", help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--flat",
        choices=("auto", "on", "off"),
        default="auto",
        help="our chain flat (where this checkout has the flat update); auto: the trainer's "
        "default",
    )
    args = parser.parse_args(argv)

    import jax

    from benchmarks import common, step_parts

    flat = {"auto": None, "on": True, "off": False}[args.flat]
    now = dt.datetime.now(dt.timezone.utc)
    record: dict[str, Any] = {
        "suite": "gpu-step-smoke" if args.smoke else "gpu-step",
        "stamp": now.strftime("%Y%m%dT%H%M%S"),
        "started": now.isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "budget_s": args.budget_s,
        "backend": jax.default_backend(),
        "machine": common.machine_info(),
        "flat_available": step_parts.flat_available(),
        "complete": False,
    }
    start = time.perf_counter()

    def save(results: dict, skipped: dict) -> None:
        record.update(results=results, skipped=skipped, duration_s=time.perf_counter() - start)
        write_record(record, args.out)

    only = tuple(s for s in args.only.split(",") if s)
    results, skipped = run_sections(args.smoke, args.budget_s, only, flat, save)
    record["complete"] = True
    save(results, skipped)
    print(f"[gpu_step] wrote {write_record(record, args.out)}")
    print(json.dumps(step_parts.summary(results), indent=1))
    failed = [k for k, v in results.items() if "error" in v and "time budget" not in v["error"]]
    if failed:
        print(f"[gpu_step] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
