"""``config.do_train = False``: evaluate and predict with a given model, without training.

``config.model`` names the model: a fine-tuned model folder (a run's ``model/``, or any Hugging
Face sequence-classification checkpoint with the task's labels), a run's output folder (its
``model/``, else its newest checkpoint), or a checkpoint: a run's ``checkpoints/`` folder (the
newest) or one ``checkpoints/<step>`` folder. A checkpoint's parameters are restored into the model
its run started from (recorded in the checkpoint). The dev sets are scored, the predictions
written (:mod:`childtuning_trainer.predictions`), and ``results.json`` marks the run as an
evaluation (``"evaluation": true``, no training history).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import transformers
from flax import nnx

from childtuning_trainer import extra_eval, final_outputs, outputs, parallel, saved_model, steps
from childtuning_trainer.run_setup import prepare
from childtuning_trainer.settings import Settings


class Source(NamedTuple):
    """Where the evaluated parameters come from: a model folder or hub name (``model``), and for
    a checkpoint its folder (``checkpoints/``) and step."""

    model: str
    checkpoints: str | None = None
    step: int | None = None


def _steps(folder: str) -> list[int]:
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(folder, n)))


def resolve_source(path: str, task_name: str) -> Source:
    """The :class:`Source` that ``config.model`` names (see the module docstring).

    Raises:
      ValueError: a checkpoint of another task, or a run folder with neither model nor checkpoint.
    """
    if os.path.isfile(os.path.join(path, saved_model.MODEL_DIR, "config.json")):
        return Source(os.path.join(path, saved_model.MODEL_DIR))
    if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")):
        folder, step = os.path.dirname(os.path.abspath(path)), int(os.path.basename(path))
    elif _steps(path) or _steps(os.path.join(path, "checkpoints")):
        folder = path if _steps(path) else os.path.join(path, "checkpoints")
        step = _steps(folder)[-1]
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"config.model={path!r} holds no model/, checkpoint or config.json.")
    else:
        _check_head(path)
        return Source(path)
    meta = _manager(folder).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    config = meta.meta["config"]
    if config["task"].lower().replace("-", "") != task_name.lower().replace("-", ""):
        raise ValueError(
            f"config.model={path!r} is a checkpoint of task {config['task']!r}, "
            f"not of config.task={task_name!r}."
        )
    return Source(config["model"], folder, step)


def _check_head(model: str) -> None:
    """Refuses a model without a sequence-classification head (nothing to evaluate)."""
    try:
        architectures = transformers.AutoConfig.from_pretrained(model).architectures or []
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot load model {model!r}: {e}") from None
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"config.do_train=False needs a fine-tuned model; config.model={model!r} has no "
            "sequence-classification head (a run's model/ folder or checkpoint has one)."
        )


def _manager(folder: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(folder), options=ocp.CheckpointManagerOptions())


def restore_params(source: Source, template: nnx.State) -> nnx.State:
    """The parameters of the checkpoint ``source`` names, in ``template``'s form."""
    manager = _manager(source.checkpoints)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    saved = manager.restore(source.step, args=args).state["params"]
    manager.close()

    def leaf(path, _):  # orbax keeps NNX's variable wrappers ({"value": ...}), keys as strings
        node = saved
        for key in (p.key for p in path):
            node = node[str(key)] if str(key) in node else node[key]
        return np.asarray(node["value"] if isinstance(node, dict) else node)

    pure = jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(template))
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def evaluate_only(run_settings: Settings) -> tuple[dict, Any]:
    """Scores ``config.model`` on the dev sets, writes the predictions and ``results.json``;
    returns ``(results, params on the host)``."""
    source = resolve_source(run_settings.model.name, run_settings.task.name)
    run_settings = dataclasses.replace(
        run_settings,
        model=dataclasses.replace(run_settings.model, name=source.model),
        # The training set only fits the padding buckets here: one example will do.
        data=dataclasses.replace(run_settings.data, max_train_samples=1),
    )
    with warnings.catch_warnings():
        if source.checkpoints:  # the head comes from the checkpoint
            warnings.filterwarnings("ignore", ".*newly initialised")
        run = prepare(run_settings)
    run.manager.close()
    params = run.params if source.checkpoints is None else restore_params(source, run.params)
    replicated = parallel.replicate(params, run.devices)
    start = time.perf_counter()
    metrics = steps.evaluate(run.eval_step(), replicated, run.data, run.devices, run.global_batch)
    eval_time_s = time.perf_counter() - start
    extra = extra_eval.evaluate(
        run.extra_sets,
        run.model,
        replicated,
        run.task.labels,
        run.devices,
        run.global_batch,
        run.data.padding,
    )
    outs = run_settings.outputs
    files = final_outputs.write_predictions(run, replicated) if outs.write_predictions else []
    results = {
        "task": run.task.name,
        "evaluation": True,
        "model": run_settings.config["model"],
        "source": source._asdict(),
        "num_dev_examples": {
            d.name: len(f["labels"]) for d, f in zip(run.task.dev_sets, run.data.dev, strict=True)
        },
        "max_seq_length": run_settings.data.max_seq_length,
        "eval": metrics,
        "extra_eval": extra,
        "predictions": files,
        "eval_time_s": eval_time_s,
        "config": run_settings.config,
    }
    try:  # the checkpoint folder prepare() made: an evaluation writes none
        os.rmdir(os.path.join(outs.output_dir, "checkpoints"))
    except OSError:
        pass
    outputs.write_json(os.path.join(outs.output_dir, "results.json"), results)
    print(f"Evaluated {run_settings.config['model']}: {metrics}")
    return results, parallel.to_host(replicated)
