"""Test set-up, applied before JAX starts.

- Four host CPU devices, so the pmap tests run data-parallel on a CPU-only machine.
- Offline Hugging Face: nothing is downloaded during tests.
- JAX's persistent compilation cache in `.jax_cache/`: tests that build the same jitted step for
  the same tiny model compile it once per run instead of once per test.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
