"""Test set-up, applied before JAX starts.

- Four host CPU devices, so the pmap tests run data-parallel on a CPU-only machine; XLA's
  backend optimisation off (compile time dominates the suite).
- Offline Hugging Face: nothing is downloaded during tests.
- JAX's persistent compilation cache in `.jax_cache/`: tests that build the same jitted step for
  the same tiny model compile it once per run instead of once per test.
"""

import os
import pathlib

# LLVM optimisation level 0: the tests' tiny models compile about a quarter faster, and their
# run time hardly matters (every comparison in the suite is between runs compiled the same way).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
