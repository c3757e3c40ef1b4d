"""The fine-tuned model a run leaves behind: its final parameters as one msgpack file.

Checkpoints (:mod:`childtuning_trainer.checkpoints`) hold the whole training state and are pruned
as training goes on; ``params.msgpack`` holds only the parameters, by name, for later use (the
task-generalisation probe of :mod:`childtuning_trainer.experiments` reads it). It is written to a
temporary name and renamed, so a half-written file is never read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

FILENAME = "params.msgpack"


def save_params(output_dir: str, params: Any) -> str:
    """Writes ``params`` (an NNX ``State`` or a nested dict); returns the path."""
    path = os.path.join(output_dir, FILENAME)
    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    data = serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


def load_params(path: str, template: nnx.State) -> nnx.State:
    """The parameters saved at ``path`` (a file or a run's output folder), in ``template``'s form.

    Raises:
      FileNotFoundError: nothing saved there.
      ValueError: the saved tree does not have ``template``'s leaf names and shapes.
    """
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No saved parameters at {path!r}.")
    with open(path, "rb") as f:
        saved = serialization.msgpack_restore(f.read())
    expected = nnx.to_pure_dict(template)
    got_shapes = jax.tree.map(np.shape, saved)
    want_shapes = jax.tree.map(np.shape, expected)
    if got_shapes != want_shapes:
        raise ValueError(
            f"{path!r} does not hold parameters of this model (names or shapes differ)."
        )
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, saved)
    return state
