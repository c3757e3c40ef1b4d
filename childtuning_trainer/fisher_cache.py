"""A content-addressed store of Fisher passes, so runs that share one compute it once.

ChildTuning-D, its pruning and lowest-Fisher ablations, and D with most regularisers start from
the same Fisher information for a given task, seed and training subset, and on CPU the pass is a
sizeable share of a short run. With ``config.fisher_cache_dir`` set, each pass is keyed by a
SHA-256 of everything it reads (:func:`fisher_key`): the params, every batch, the dropout key, the
settings that shape the computation (model architecture, compute dtype, clipping, device count
and kind, CPU cores), the library versions and the source of this project's packages. A stored
pass is loaded instead of computed, so a hit is exactly the array the same command would compute;
any change to the code or the inputs is a new key. Files are written whole (temporary file, then
rename), so an interrupted write never leaves a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from childtuning_jax import leaf_names, map_with_name

# The packages whose source can change what a Fisher pass computes, and what of them a training
# run never imports (the sweep, its reports and probes), so editing a report keeps the cache.
PACKAGES = ("childtuning_jax", "childtuning_trainer")
NOT_IMPORTED_BY_TRAINING = ("childtuning_trainer/experiments",)


def _hash_sources() -> str:
    digest = hashlib.sha256()
    for package in PACKAGES:
        root = pathlib.Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            name = path.relative_to(root.parent).as_posix()
            if name.startswith(tuple(p + "/" for p in NOT_IMPORTED_BY_TRAINING)):
                continue
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# Read once, when the trainer imports this module: the code the process runs, not later edits.
_SOURCE_DIGEST = _hash_sources()


def source_digest() -> str:
    """SHA-256 of every ``.py`` file of :data:`PACKAGES` (relative path and bytes), but those
    under :data:`NOT_IMPORTED_BY_TRAINING`, as they were when this module was imported."""
    return _SOURCE_DIGEST


def library_versions() -> dict[str, str]:
    import flax
    import jaxlib
    import optax

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


def _update_array(digest: Any, name: str, array: Any) -> None:
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f"{name}|{array.dtype.str}|{array.shape}\0".encode())
    digest.update(array.tobytes())


def fisher_key(
    settings: Mapping[str, Any],
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    rng: jax.Array | None,
) -> str:
    """The hex SHA-256 of a Fisher pass's inputs.

    ``settings``: JSON-serialisable values that shape the computation; the project's source digest
    and library versions are added here. ``batches``: the pass's batches in order (consumed).
    """
    digest = hashlib.sha256()
    header = {**settings, "source": source_digest(), "versions": library_versions()}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode() + b"\0")
    for name, leaf in zip(leaf_names(params), jax.tree.leaves(params), strict=True):
        _update_array(digest, "param:" + name, leaf)
    digest.update(b"rng\0")
    if rng is not None:
        _update_array(digest, "rng", jax.random.key_data(rng))
    for index, batch in enumerate(batches):
        for name in sorted(batch):
            _update_array(digest, f"batch{index}:{name}", batch[name])
    return digest.hexdigest()


def cache_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"fisher-{key}.npz")


def load(directory: str, key: str, params: Any) -> Any | None:
    """The stored pass for ``key`` shaped as ``params`` (float32 host arrays), or ``None``."""
    path = cache_path(directory, key)
    if not os.path.exists(path):
        return None
    with np.load(path) as stored:
        names = list(stored["names"])
        arrays = dict(zip(names, (stored[f"arr_{i}"] for i in range(len(names))), strict=True))
    expected = leaf_names(params)
    if names != expected:
        raise ValueError(f"Fisher cache file {path} does not match the model's parameters")
    return map_with_name(lambda name, _: arrays[name], params)


def save(directory: str, key: str, fisher: Any) -> str:
    """Stores ``fisher`` under ``key`` (atomically); returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = cache_path(directory, key)
    names = np.array(leaf_names(fisher))
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(fisher)]
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
        with os.fdopen(handle, "wb") as f:
            np.savez(f, *leaves, names=names)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
