"""Hugging Face PyTorch checkpoints <-> Flax NNX parameters, and safetensors I/O.

A Flax parameter name maps to a PyTorch state-dict key by joining with ``.`` and renaming the
leaf: ``kernel`` -> ``weight`` (transposed: Flax ``(in, out)``, PyTorch ``(out, in)``),
``embedding`` -> ``weight``, LayerNorm ``scale`` -> ``weight``, ``bias`` -> ``bias``. XLNet's bare
``nn.Parameter`` tensors (``q``, ``k``, ``v``, ``o``, ``r``, ``r_r_bias``, ``r_s_bias``,
``r_w_bias``, ``seg_embed``, ``mask_emb``) keep their names and layouts. No torch is needed
for safetensors; ``pytorch_model.bin`` needs torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from childtuning_jax.paths import map_with_name

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)

_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Parameters that are bare tensors in PyTorch (XLNet): same name, same layout, N(0, std) init.
_RAW_LEAVES = frozenset(
    ("q", "k", "v", "o", "r", "r_r_bias", "r_s_bias", "r_w_bias", "seg_embed", "mask_emb")
)
# Buffers and pre-training heads a sequence-classification model does not use.
_IGNORED_SUFFIXES = (".position_ids", ".token_type_ids")
_IGNORED_PREFIXES = (
    "cls.",  # BERT
    "lm_head.",  # RoBERTa
    "roberta.pooler.",
    "discriminator_predictions.",  # ELECTRA
    "lm_loss.",  # XLNet
)


def torch_key(name: str) -> tuple[str, bool]:
    """The PyTorch key for Flax parameter ``name`` and whether the array is transposed."""
    *path, leaf = name.split("/")
    if leaf in _RAW_LEAVES:
        return name.replace("/", "."), False
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"No PyTorch name for parameter {name!r} (unknown leaf {leaf!r})")
    return ".".join([*path, _LEAF_TO_TORCH[leaf]]), leaf == "kernel"


def _normalise_key(key: str) -> str:
    # Old BERT checkpoints (e.g. bert-base-uncased) name LayerNorm parameters gamma / beta.
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


# ---------------------------------------------------------------------------------------------
# Reading and writing checkpoint files
# ---------------------------------------------------------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            if f.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16
                with safe_open(path, framework="flax") as g:
                    out[key] = np.asarray(g.get_tensor(key), dtype=np.float32)
            else:
                out[key] = f.get_tensor(key)
    return out


def _read_pytorch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle and torch is not installed; install torch or convert "
            f"the checkpoint to {SAFETENSORS}"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        k: (v.float() if v.is_floating_point() else v).numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def read_state_dict(paths: Iterable[str]) -> dict[str, np.ndarray]:
    """Reads checkpoint files (``.safetensors`` or PyTorch ``.bin``) into one numpy state dict.

    Floating-point tensors come back as float32; LayerNorm ``gamma``/``beta`` become
    ``weight``/``bias``.
    """
    state: dict[str, np.ndarray] = {}
    for path in paths:
        read = _read_safetensors if path.endswith(".safetensors") else _read_pytorch
        try:
            tensors = read(path)
        except (OSError, ValueError, RuntimeError) as e:
            raise OSError(f"Cannot read checkpoint file {path}: {e}") from e
        for key, value in tensors.items():
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32, copy=False)
            state[_normalise_key(key)] = value
    return state


def shard_files(index_path: str) -> list[str]:
    """The shard file names listed by a sharded checkpoint's ``*.index.json``, in order."""
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    return sorted(set(weight_map.values()))


def write_safetensors(state: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict as safetensors that ``transformers`` (PyTorch) loads."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def init_like_hf(
    name: str,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    std: float,
    padding_idx: int | None = None,
) -> np.ndarray:
    """Hugging Face's ``_init_weights`` for one tensor.

    N(0, ``std``) weights, embeddings and XLNet's bare tensors (an embedding's padding row
    zero), zero biases, unit LayerNorm scales.
    """
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("kernel", "embedding") or leaf in _RAW_LEAVES:
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if padding_idx is not None and 0 <= padding_idx < shape[0]:
            value[padding_idx] = 0.0
        return value
    if leaf == "scale":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


class LoadReport:
    """What :func:`params_from_state_dict` initialised or skipped (PyTorch key names)."""

    def __init__(self) -> None:
        self.initialised: list[str] = []
        self.mismatched: list[str] = []
        self.unexpected: list[str] = []


def params_from_state_dict(
    abstract: Any,
    state: Mapping[str, np.ndarray],
    *,
    base_prefix: str,
    head_prefixes: tuple[str, ...],
    std: float,
    seed: int = 0,
    ignore_mismatched_sizes: bool = False,
    padding_rows: Mapping[str, int] | None = None,
) -> tuple[Any, LoadReport]:
    """Fills a pytree of parameter shapes (e.g. an NNX ``State`` of ``ShapeDtypeStruct``).

    Args:
      abstract: parameters to fill, named as in :mod:`childtuning_jax.paths`.
      state: a PyTorch state dict (numpy arrays), with or without the ``base_prefix.`` prefix
        (a bare ``BertModel`` / ``RobertaModel`` / ... checkpoint has none).
      base_prefix: the encoder's name: ``"bert"``, ``"roberta"``, ``"electra"`` or
        ``"transformer"`` (XLNet).
      head_prefixes: Flax name prefixes of the task head; these may be missing from the
        checkpoint and are then initialised as Hugging Face does (N(0, ``std``), zero bias).
      std: ``initializer_range``.
      seed: seeds the initialisation of missing tensors.
      ignore_mismatched_sizes: re-initialise tensors whose shape differs (as HF's option of that
        name) instead of raising.
      padding_rows: embedding name -> padding index, a row that initialisation leaves zero.

    Returns:
      The filled parameters (float32 numpy arrays) and a :class:`LoadReport`.

    Raises:
      KeyError: an encoder tensor is missing from the checkpoint.
      ValueError: a tensor's shape does not fit the config.
    """
    report = LoadReport()
    padding_rows = padding_rows or {}
    used: set[str] = set()
    missing: list[str] = []
    counter = iter(range(1 << 30))

    def fill(name: str, leaf: Any) -> np.ndarray:
        key, transpose = torch_key(name)
        shape = tuple(leaf.shape)
        rng = np.random.default_rng([seed, next(counter)])
        init = lambda: init_like_hf(name, shape, rng, std, padding_rows.get(name))
        candidates = [key]
        if key.startswith(base_prefix + "."):
            candidates.append(key[len(base_prefix) + 1 :])
        found = next((k for k in candidates if k in state), None)
        if found is None:
            if not name.startswith(head_prefixes):
                missing.append(key)
                return np.zeros((0,), np.float32)
            report.initialised.append(key)
            return init()
        used.add(found)
        value = state[found].T if transpose else state[found]
        if value.shape == shape:
            return np.asarray(value, np.float32)
        if not ignore_mismatched_sizes:
            expected = shape[::-1] if transpose else shape
            hint = " (pass ignore_mismatched_sizes=True to re-initialise it)"
            raise ValueError(
                f"Checkpoint tensor {found!r} has shape {tuple(state[found].shape)}, but the "
                f"config needs {expected}" + (hint if name.startswith(head_prefixes) else "")
            )
        report.mismatched.append(found)
        return init()

    params = map_with_name(fill, abstract)
    if missing:
        raise KeyError(
            f"Checkpoint lacks {len(missing)} encoder tensor(s) the config needs: "
            + ", ".join(missing[:8])
            + (", ..." if len(missing) > 8 else "")
        )
    report.unexpected = sorted(
        k
        for k in state
        if k not in used
        and not k.endswith(_IGNORED_SUFFIXES)
        and not k.startswith(_IGNORED_PREFIXES)
        and not (base_prefix == "roberta" and k.startswith("pooler."))
    )
    return params, report


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """PyTorch state dict (float32 numpy, ``(out, in)`` weights) of Flax parameters."""
    out: dict[str, np.ndarray] = {}

    def put(name: str, value: Any) -> None:
        key, transpose = torch_key(name)
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        out[key] = array.T if transpose else array

    map_with_name(put, params)
    return out


def local_weight_files(directory: str) -> list[str] | None:
    """The weight files of a local checkpoint folder (safetensors first), or ``None``."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            return [os.path.join(directory, shard) for shard in shard_files(path)]
        return [path]
    return None
