"""Compile once: JAX's persistent compilation cache for the trainer, and what a run compiled.

The cache is on by default: ``config.compilation_cache_dir`` names its folder; empty means
``$JAX_COMPILATION_CACHE_DIR`` when set (the sweep sets it to its ``.jax_cache``), else
:data:`DEFAULT_DIR`; ``"none"`` turns it off. A program compiled once for the same shapes and
settings is then loaded, not compiled, by the next process.

:func:`run_report` gives ``results.json`` the number of XLA programs the process obtained
(compiled, or loaded from the cache) and the peak device memory (``None`` where the platform
keeps no statistics, as the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "childtuning_jax", "xla")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one XLA program obtained
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # ... of which loaded from the cache
_counts = {COMPILE_EVENT: 0, CACHE_HIT_EVENT: 0}
_listening: list[bool] = []


def cache_dir(configured: str) -> str | None:
    """The cache folder for ``config.compilation_cache_dir`` (``None``: off)."""
    if configured.lower() == "none":
        return None
    chosen = configured or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR
    return os.path.abspath(os.path.expanduser(chosen))


def use_cache(configured: str) -> str | None:
    """Turns the persistent cache on in ``cache_dir(configured)``; returns the folder. Every
    program is cached, however fast it compiled (small ones add up over a sweep), unless the
    ``JAX_PERSISTENT_CACHE_MIN_*`` variables say otherwise."""
    count_programs()
    folder = cache_dir(configured)
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    if event == COMPILE_EVENT:
        _counts[COMPILE_EVENT] += 1


def _on_event(event: str, **kwargs: Any) -> None:
    if event == CACHE_HIT_EVENT:
        _counts[CACHE_HIT_EVENT] += 1


def count_programs() -> None:
    """Starts counting the XLA programs this process obtains (once per process)."""
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening.append(True)


def programs() -> dict[str, int]:
    """``{"compiled_programs", "cache_hits"}`` so far in this process."""
    return {"compiled_programs": _counts[COMPILE_EVENT], "cache_hits": _counts[CACHE_HIT_EVENT]}


def peak_memory(devices: Sequence[jax.Device]) -> int | None:
    """The largest peak bytes in use of this process's ``devices`` (``None``: not reported)."""
    peaks = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def run_report(devices: Sequence[jax.Device], start: dict[str, int] | None = None) -> dict:
    """``results.json``'s compile and memory fields: the programs obtained since ``start`` (a
    :func:`programs` snapshot; default: since the process started counting) and the peak device
    memory."""
    now, start = programs(), start or {}
    counts = {key: value - start.get(key, 0) for key, value in now.items()}
    return {**counts, "peak_device_memory_bytes": peak_memory(devices)}
