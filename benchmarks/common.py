"""Shared helpers for the benchmarks: timing, BERT-shaped pytrees, machine facts, peak memory.

Timings on a shared machine are noisy, so every comparison runs its contenders *alternately*
(round ``r`` runs each contender once, in a rotated order) and reports medians; ratios are taken
between medians measured in the same rounds.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from childtuning_jax import official_eligibility

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def block(tree: Any) -> Any:
    """Waits for every JAX array in ``tree`` (anything else passes through)."""
    import jax

    return jax.block_until_ready(tree)


def alternate(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 1,
    pause_s: float = 0.0,
) -> dict[str, list[float]]:
    """Times each contender once per round, alternating, and returns the seconds per call.

    Each callable must finish its work before returning (block on JAX outputs inside it).
    ``warmup`` untimed rounds run first (compilation, allocator warm-up). The order within a
    round rotates so no contender always runs right after another one; ``pause_s`` sleeps
    before every call so one framework's spinning worker threads have gone idle before the
    other one starts.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if pause_s:
                time.sleep(pause_s)
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and relative spread ((max - min) / median) of timing samples."""
    med = median(samples)
    return {
        "median_s": med,
        "min_s": float(min(samples)),
        "max_s": float(max(samples)),
        "spread": float((max(samples) - min(samples)) / med) if med > 0 else 0.0,
        "samples_s": [float(s) for s in samples],
    }


def ratio(samples: Mapping[str, list[float]], num: str, den: str) -> float:
    """``median(num) / median(den)``."""
    return median(samples[num]) / median(samples[den])


# ---------------------------------------------------------------------------------------------
# BERT-shaped parameter pytrees (names as in childtuning_jax.models)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertShape:
    """The dimensions of a BERT encoder (Devlin et al., 2019), as in ``transformers.BertConfig``."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 30522
    max_position: int = 512
    type_vocab: int = 2
    num_labels: int = 2
    dropout: float = 0.1  # hidden and attention-probability dropout (BERT's 0.1)


BERT_BASE = BertShape("bert-base", hidden=768, layers=12, intermediate=3072)
BERT_LARGE = BertShape("bert-large", hidden=1024, layers=24, intermediate=4096)
# The smoke tests' model: one small layer, no dropout (faster to compile).
BERT_TINY = BertShape(
    "bert-tiny", hidden=32, layers=1, intermediate=64, vocab=128, max_position=64, dropout=0.0
)


def bert_param_shapes(shape: BertShape) -> dict[str, tuple[int, ...]]:
    """Leaf name -> shape of a ``BertForSequenceClassification`` in our naming (Flax layout).

    Flax ``Linear`` kernels are (in, out), the transpose of PyTorch's ``weight``; a transpose does
    not change which values are in the top ``p`` fraction, so masks compare element for element.
    """
    h, i = shape.hidden, shape.intermediate
    out: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings/embedding": (shape.vocab, h),
        "bert/embeddings/position_embeddings/embedding": (shape.max_position, h),
        "bert/embeddings/token_type_embeddings/embedding": (shape.type_vocab, h),
        "bert/embeddings/LayerNorm/scale": (h,),
        "bert/embeddings/LayerNorm/bias": (h,),
    }
    for n in range(shape.layers):
        p = f"bert/encoder/layer/{n}"
        for q in ("query", "key", "value"):
            out[f"{p}/attention/self/{q}/kernel"] = (h, h)
            out[f"{p}/attention/self/{q}/bias"] = (h,)
        out[f"{p}/attention/output/dense/kernel"] = (h, h)
        out[f"{p}/attention/output/dense/bias"] = (h,)
        out[f"{p}/attention/output/LayerNorm/scale"] = (h,)
        out[f"{p}/attention/output/LayerNorm/bias"] = (h,)
        out[f"{p}/intermediate/dense/kernel"] = (h, i)
        out[f"{p}/intermediate/dense/bias"] = (i,)
        out[f"{p}/output/dense/kernel"] = (i, h)
        out[f"{p}/output/dense/bias"] = (h,)
        out[f"{p}/output/LayerNorm/scale"] = (h,)
        out[f"{p}/output/LayerNorm/bias"] = (h,)
    out["bert/pooler/dense/kernel"] = (h, h)
    out["bert/pooler/dense/bias"] = (h,)
    out["classifier/kernel"] = (h, shape.num_labels)
    out["classifier/bias"] = (shape.num_labels,)
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/0": x}`` -> ``{"a": {"b": {"0": x}}}`` (string keys, so names round-trip)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def count_params(shapes: Mapping[str, tuple[int, ...]], *, eligible_only: bool = False) -> int:
    """Number of values, optionally only in leaves ChildTuning-D may select
    (``childtuning_jax.official_eligibility``)."""
    return sum(
        int(np.prod(s)) for n, s in shapes.items() if not eligible_only or official_eligibility(n)
    )


def random_fisher(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Fisher-like float32 values per leaf: exponential draws with a per-leaf scale, so the
    global threshold cuts through leaves unevenly, as real Fisher information does."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        values = rng.standard_exponential(shape, dtype=np.float32)
        values *= np.float32(10.0 ** rng.uniform(-2, 1))
        out[name] = values
    return out


# ---------------------------------------------------------------------------------------------
# Machine facts and memory
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What produced the numbers: host, CPU, core count, load, library versions, JAX devices."""
    import jax
    import jaxlib

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mem_total_gib": _mem_total_gib(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmHWM`` (peak resident set) or ``VmRSS``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Frees cached heap memory, then resets ``VmHWM`` to the current RSS (Linux >= 4.0).

    Returns False where the kernel does not allow it (the peak then covers the whole process).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
