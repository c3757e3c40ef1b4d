"""The sweep's run groups: runs that can share a program trained together, one process a group.

``sweep.py --group_size=N`` packs up to N unfinished runs that differ only in what a group may
vary (:data:`childtuning_trainer.run_groups.VARYING_KEYS`: seed, learning rate, ``reserve_p``,
vanilla with D, F alone) into one ``childtuning-train --config.group_runs=FILE`` process
(:mod:`childtuning_trainer.group_loop`). Each run still works in ``runs/sweep/<run_id>`` and is
recorded under its own run id, as :func:`.runner.run_one` records it, so the report and a later
sweep (of any group size) treat it as any other run. The group's checkpoints sit in
``runs/sweep/group-<hash of its run ids>``: a killed group resumes as one.

Before a group starts, its memory is estimated (:func:`run_bytes`: params, two Adam moments, the
gradient, the mask and the regulariser's anchors per run) against the device's: a group that
does not fit is shrunk, or refused when one run alone does not fit, with one line.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from childtuning_trainer.experiments import runner, store
from childtuning_trainer.experiments.store import RunSpec

VARYING = ("seed", "learning_rate", "reserve_p", "mode", "mask_rule", "prune")  # run_groups'
ANCHORED = ("decay_to_pretrained", "recadam", "mixout")  # regularisers holding the weights at 0
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.msgpack", "*.h5")
ACCELERATOR_GROUP_SIZE = 10  # the default on a GPU or TPU (1 on a CPU)
MEMORY_SHARE = 0.8  # of the device's memory a group may plan to use (activations need the rest)


def group_key(spec: RunSpec) -> tuple:
    """What runs of one group share: every override but those a group varies; F apart (with its
    reserve_p), vanilla and D together."""
    overrides = dict(spec.overrides)
    shared = tuple((k, v) for k, v in spec.overrides if k not in VARYING)
    if overrides.get("mode", "D") == "F":
        return (*shared, ("mode", "F"), ("reserve_p", overrides.get("reserve_p")))
    return shared


def pack(specs: Sequence[RunSpec], size: int) -> list[list[RunSpec]]:
    """``specs`` in groups of at most ``size`` sharing a :func:`group_key`, in order of their
    first run."""
    groups: dict[tuple, list[list[RunSpec]]] = {}
    order: list[list[RunSpec]] = []
    for spec in specs:
        chunks = groups.setdefault(group_key(spec), [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(spec)
    return order


def device_memory() -> tuple[str, int | None]:
    """The first device's platform and memory in bytes (``None``: unknown), asked of a separate
    process so this one never holds the accelerator."""
    code = (
        "import jax, json; d = jax.devices()[0]; s = d.memory_stats() or {}; "
        "print(json.dumps([d.platform, s.get('bytes_limit')]))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        )
        platform, limit = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return "unknown", None
    if limit is None and platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return platform, limit


def default_group_size(platform: str) -> int:
    return 1 if platform in ("cpu", "unknown") else ACCELERATOR_GROUP_SIZE


def model_bytes(model: str) -> int | None:
    """The float32 size of a local checkpoint's weights (the largest weight file), else None."""
    sizes = [os.path.getsize(p) for w in WEIGHT_FILES for p in glob.glob(os.path.join(model, w))]
    return max(sizes) if sizes else None


def run_bytes(model: str, regularizer: str = "none") -> int | None:
    """One stacked run's device memory: params, gradient, two Adam moments (4 copies), a packed
    mask (1/32 of the float32 params) and the anchor of an anchored regulariser (one more)."""
    size = model_bytes(model)
    if size is None:
        return None
    copies = 4 + (regularizer in ANCHORED)
    return int(size * copies + size / 32)


def fit_size(size: int, per_run: int | None, memory: int | None) -> int:
    """The largest group size up to ``size`` whose runs fit in ``MEMORY_SHARE`` of ``memory``;
    one line when it shrinks the group; ``ValueError`` when not even one run fits."""
    if per_run is None or memory is None:
        return size
    fits = int(MEMORY_SHARE * memory // per_run)
    if fits < 1:
        raise ValueError(
            f"one run needs about {per_run / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of "
            f"the device's {memory / 2**30:.1f} GiB: no group fits."
        )
    if fits < size:
        print(
            f"group_size {size} -> {fits}: {size} runs need about {size * per_run / 2**30:.1f} "
            f"GiB, the device has {memory / 2**30:.1f} GiB"
        )
    return min(size, fits)


def fitted_group_size(requested: int | None, specs: Sequence[RunSpec], default_model: str) -> int:
    """``--group_size`` (``None``: the device's default), shrunk to what the device's memory holds
    for the largest run of ``specs`` (one line when it shrinks; ``ValueError`` when none fits)."""
    if requested is not None and requested < 1:
        raise ValueError(f"--group_size={requested}: expected 1 or more.")
    if requested == 1:
        return 1
    platform, memory = device_memory()
    size = requested or default_group_size(platform)
    if size == 1:
        return 1
    sizes = (run_bytes(s.get("model", default_model), s.get("regularizer", "none")) for s in specs)
    per_run = max((b or 0 for b in sizes), default=0)
    return fit_size(size, per_run or None, memory)


def group_command(
    specs: Sequence[RunSpec], group_dir: str, kwargs: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The group's ``childtuning-train`` command (its runs listed in
    ``group_dir/group_runs.json``) and each run's folder."""
    work_dir = kwargs.get("work_dir", store.WORK_DIR)
    settings = dict(kwargs.get("settings") or {})
    data_dirs = kwargs.get("data_dirs") or {}
    if data_dirs and specs[0].get("task") in data_dirs:
        settings["data_dir"] = data_dirs[specs[0].get("task")]
    folders = [os.path.join(work_dir, spec.run_id) for spec in specs]
    runs = [
        {**{k: v for k, v in spec.overrides if k in VARYING}, "output_dir": os.path.abspath(f)}
        for spec, f in zip(specs, folders, strict=True)
    ]
    os.makedirs(group_dir, exist_ok=True)
    listing = os.path.join(group_dir, "group_runs.json")
    with open(listing, "w") as f:
        json.dump(runs, f, indent=1)
    # The shared overrides only: a run that leaves a varying key unset keeps the config's value.
    lead = RunSpec(tuple((k, v) for k, v in specs[0].overrides if k not in VARYING))
    command = runner.train_command(
        lead,
        kwargs.get("config_file", "glue"),
        group_dir,
        {**settings, "group_runs": os.path.abspath(listing)},
        kwargs.get("train_script", runner.TRAIN_MODULE),
    )
    return command, folders


def run_group(specs: Sequence[RunSpec], **kwargs: Any) -> list[dict]:
    """Trains (or resumes) ``specs`` as one group process; returns their records."""
    work_dir = kwargs.get("work_dir", store.WORK_DIR)
    digest = hashlib.sha1(" ".join(s.run_id for s in specs).encode()).hexdigest()[:10]
    group_dir = os.path.join(work_dir, f"group-{digest}")
    command, folders = group_command(specs, group_dir, kwargs)
    log_path = os.path.join(group_dir, "log.txt")
    cache_dir = kwargs.get("cache_dir", runner.CACHE_DIR)
    returncode, wall = runner.run_logged(command, log_path, cache_dir)
    if returncode != 0:
        error = runner.last_error(log_path)
        raise RuntimeError(f"group {group_dir} failed ({error}); see {log_path}")
    results_file = kwargs.get("results_file", store.RESULTS_FILE)
    keep = kwargs.get("keep_checkpoints", False)
    return [
        runner.record_finished(spec, folder, command, wall / len(specs), results_file, keep)
        for spec, folder in zip(specs, folders, strict=True)
    ]


def run_all_grouped(
    specs: Sequence[RunSpec],
    group_size: int,
    *,
    on_result: Callable[[], None] | None = None,
    **kwargs: Any,
) -> tuple[list[dict], list[str]]:
    """:func:`.runner.run_all` with up to ``group_size`` runs per process (``wall_time_s``: the
    group's wall time shared out over its runs)."""
    done = store.recorded(kwargs.get("results_file", store.RESULTS_FILE))
    records = [done[s.run_id] for s in specs if s.run_id in done]
    todo = [s for s in specs if s.run_id not in done]
    failures: list[str] = []
    work_dir = kwargs.get("work_dir", store.WORK_DIR)
    for group in pack(todo, group_size):
        with contextlib.ExitStack() as locks:
            mine = [s for s in group if locks.enter_context(runner.run_lock(s.run_id, work_dir))]
            if not mine:
                continue
            print(f"group of {len(mine)}: {', '.join(s.run_id for s in mine)}", flush=True)
            try:
                finished = run_group(mine, **kwargs)
            except RuntimeError as e:
                print(f"  failed: {e}", flush=True)
                failures.append(str(e))
                continue
        records += finished
        print(f"  done in {sum(r['wall_time_s'] for r in finished):.0f}s", flush=True)
        if on_result is not None:
            on_result()
    return records, failures
