"""The fine-tuned model a run leaves behind: ``output_dir/model/``, a folder Hugging Face loads.

``model/`` holds ``config.json`` (a sequence-classification config with the task's ``num_labels``,
its label names as ``id2label`` / ``label2id``, ``problem_type`` regression for STS-B),
``model.safetensors`` and the tokenizer, written by :func:`childtuning_jax.models.save_pretrained`.
``transformers.AutoModelForSequenceClassification.from_pretrained`` (PyTorch) and
:func:`childtuning_jax.models.from_pretrained` both load it. It is written to a temporary folder
and renamed, so a half-written model is never read.

Runs before ``model/`` existed wrote ``params.msgpack`` (the parameters alone, by name);
:func:`load_params` still reads it. Checkpoints (:mod:`childtuning_trainer.checkpoints`) hold the
whole training state and are pruned as training goes on.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from childtuning_jax.models import from_pretrained, save_pretrained
from childtuning_jax.models.blocks import FrozenConfig
from childtuning_trainer.objective import Model
from childtuning_trainer.tasks import Task

MODEL_DIR = "model"
LEGACY_FILE = "params.msgpack"  # what runs wrote before model/


def labelled_config(config: Any, task: Task) -> Any:
    """A copy of a ``transformers`` config with ``task``'s label names and problem type."""
    config = copy.deepcopy(config)
    config.num_labels = task.num_labels
    if task.labels:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: i for i, label in enumerate(task.labels)}
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    return config


def save_model(output_dir: str, model: Model, params: Any, task: Task, tokenizer: Any) -> str:
    """Writes ``output_dir/model/`` (``params``: host arrays of ``model``); returns its path.

    The folder is written under a temporary name, then swapped in for the old one.
    """
    directory = os.path.join(output_dir, MODEL_DIR)
    module = nnx.merge(model.graphdef, params, model.rest)
    module.frozen_config = FrozenConfig(labelled_config(module.config, task))
    tmp, old = f"{directory}.tmp{os.getpid()}", f"{directory}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(module, tmp, tokenizer)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def saved_model_path(path: str) -> str | None:
    """What a run saved at ``path`` (a run's folder, its ``model/`` or a ``params.msgpack``
    file): the ``model/`` folder or the legacy file; ``None`` if nothing."""
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, MODEL_DIR), path, os.path.join(path, LEGACY_FILE)):
        if os.path.isfile(os.path.join(candidate, "config.json")) or os.path.isfile(candidate):
            return candidate
    return None


def _read_tree(path: str) -> Any:
    """The parameters saved at ``path`` (``model/`` or ``params.msgpack``) as a pure dict."""
    if os.path.isdir(path):
        with warnings.catch_warnings():
            # a tensor missing from model/: not this model's parameters
            warnings.filterwarnings("error", ".*(newly |re-)initialised")
            module = from_pretrained(path)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def load_params(path: str, template: nnx.State) -> nnx.State:
    """The parameters saved at ``path`` (a run's folder, its ``model/``, or a ``params.msgpack``
    file), in ``template``'s form.

    Raises:
      FileNotFoundError: nothing saved there.
      ValueError: the saved tree does not have ``template``'s leaf names and shapes.
    """
    found = saved_model_path(path)
    if found is None:
        raise FileNotFoundError(f"No saved model at {path!r} (expected {MODEL_DIR}/).")
    try:
        saved = _read_tree(found)
    except (UserWarning, KeyError) as e:
        raise ValueError(f"{found!r} does not hold parameters of this model: {e}") from None
    expected = nnx.to_pure_dict(template)
    if jax.tree.map(np.shape, saved) != jax.tree.map(np.shape, expected):
        raise ValueError(
            f"{found!r} does not hold parameters of this model (names or shapes differ)."
        )
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, saved)
    return state
