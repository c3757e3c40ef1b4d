"""Checkpoints: orbax saves of the whole training state with the run's JSON bookkeeping.

A checkpoint holds everything that determines the rest of the run: parameters, the optimizer state
(with ChildTuning-F's key or ChildTuning-D's mask, and the regularisers' anchor weights), the step,
where the data stream stands, and the dev results so far, so a resumed run continues bit for bit.

A checkpoint is all or nothing: orbax writes the state and the JSON bookkeeping of a step into one
temporary folder (``<step>.orbax-checkpoint-tmp-*``) and renames it to ``<step>`` once both are
complete; ``latest_step`` never lists a temporary folder, and a new manager deletes those a killed
run left. A checkpoint that cannot be read back (a disk filled up, a file truncated) is set aside
as ``<step>.corrupt`` with a warning, and the run resumes from the newest one that can. The state
saved is one host copy (the same whatever the layout or process count), so a
run can resume on another layout with the same global batch. In a multi-process run every
process calls these functions (orbax synchronises them; process 0 writes the files).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from childtuning_trainer import optimizer_chain, parallel, regularization
from childtuning_trainer.distributed import is_writer

if TYPE_CHECKING:
    from childtuning_trainer.settings import OutputSettings, Settings

# Settings a checkpoint must agree with to be resumed (every regulariser setting included).
RESUME_KEYS = (
    "task",
    "mode",
    "mask_rule",
    "prune",
    "model",
    "seed",
    "learning_rate",
    "num_train_epochs",
    "max_seq_length",
    "max_train_samples",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "dropout",
    "optimizer",
    "dtype",
    "padding",
    "bucket_multiple",
    "max_buckets",
    "bucket_min_share",
    "save_best",  # model/ holds the best epoch's weights from the first epoch on
    "train_file",
    "text_columns",
    "label_column",
    "label_type",
    *regularization.CONFIG_KEYS,
)
# What a key added later meant in checkpoints written before it existed.
LEGACY_VALUES = {
    "max_buckets": 0,
    "bucket_min_share": 0.0,
    "save_best": False,
    "train_file": "",
    "text_columns": "sentence",
    "label_column": "label",
    "label_type": "classification",
}


def checkpoint_manager(outputs: OutputSettings) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(outputs.output_dir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=outputs.keep_checkpoints, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: Any, meta: dict) -> None:
    """Saves the first device's copy of ``state`` and the JSON ``meta`` as ``meta['step']``."""
    host_state = parallel.to_host(state)
    meta = json.loads(json.dumps(meta))  # a snapshot: the run goes on changing its own copy
    manager.save(
        meta["step"],
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )


def restore_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The newest checkpoint's JSON bookkeeping alone, or ``None`` if there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_checkpoint(manager: ocp.CheckpointManager, template: Any) -> tuple[Any, dict] | None:
    """The newest checkpoint as (state on the host, meta), or ``None`` if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta


def restore_newest_readable(
    manager: ocp.CheckpointManager, make_template: Callable[[dict], Any]
) -> tuple[Any, dict] | None:
    """The newest checkpoint that reads back, as (state on the host, meta), or ``None`` if there
    is no checkpoint; ``make_template(meta)`` gives the state's structure.

    A checkpoint that fails to read is named in a ``warning:`` line and renamed
    ``<step>.corrupt`` (kept for inspection, never listed again); the one before it is tried.

    Raises:
      ValueError: there are checkpoints, and none of them can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, make_template(meta))
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 -- whatever a damaged file raises
            set_aside(manager, step, e)
            continue
        return restored.state, restored.meta
    if steps:
        raise ValueError(
            f"No checkpoint in {str(manager.directory)!r} can be read (set aside as "
            "<step>.corrupt); set --config.overwrite=true to start the run again."
        )
    return None


def set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Warns that checkpoint ``step`` cannot be read and renames it ``<step>.corrupt``."""
    path = os.path.join(str(manager.directory), str(step))
    cause = (str(error).strip().splitlines() or [""])[0][:200]
    print(
        f"warning: checkpoint {path} cannot be read ({type(error).__name__}: {cause}); "
        "set aside as .corrupt, trying the one before it",
        file=sys.stderr,
        flush=True,
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set_aside_{step}")
    if is_writer():
        os.replace(path, f"{path}.corrupt")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set_aside_{step}_done")
    manager.reload()


def check_resumable(settings: Settings, meta: dict, global_batch: int) -> None:
    """Refuses a checkpoint whose run differs in a :data:`RESUME_KEYS` setting or global batch."""
    saved, config = meta["config"], settings.config
    output_dir = settings.outputs.output_dir
    for key in RESUME_KEYS:
        value = saved.get(key, LEGACY_VALUES.get(key))
        if value != config[key]:
            raise ValueError(
                f"Cannot resume from {output_dir!r}: its checkpoint has "
                f"{key}={value!r}, this run {key}={config[key]!r}."
            )
    if meta["global_batch_size"] != global_batch:
        raise ValueError(
            f"Cannot resume from {output_dir!r}: global batch {meta['global_batch_size']} "
            f"there, {global_batch} here (per_device_batch_size x devices)."
        )


def saved_flat_update(settings: Settings, meta: dict) -> bool:
    """Whether the checkpoint's optimizer state is flat (``meta['flat_update']``; checkpoints
    written before the flat chain hold the per-leaf state). A run resumes with the chain its
    checkpoint was written with (both give the same results); a note says when that differs from
    this run's own choice."""
    flat = bool(meta.get("flat_update", False))
    if flat != optimizer_chain.uses_flat_update(settings.optimizer):
        kind = "flat" if flat else "per-leaf"
        print(f"Resuming with the {kind} optimizer chain the checkpoint was written with")
    return flat
