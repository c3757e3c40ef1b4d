"""The Fisher cache: its key changes with every input of a pass, and files round-trip exactly."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import childtuning_trainer
from childtuning_trainer import fisher_cache


def _inputs():
    params = {"bert": {"layer": {"0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}}
    batches = [
        {"input_ids": np.array([[1, 2, 3]], np.int32), "labels": np.array([1], np.int32)},
        {"input_ids": np.array([[4, 5, 0]], np.int32), "labels": np.array([0], np.int32)},
    ]
    return {"model": "tiny", "max_grad_norm": 1.0}, params, batches, jax.random.key(3)


def test_key_is_stable_and_changes_with_every_input():
    settings, params, batches, rng = _inputs()
    key = fisher_cache.fisher_key(settings, params, iter(batches), rng)
    assert key == fisher_cache.fisher_key(settings, params, iter(batches), rng)

    moved = jax.tree.map(np.copy, params)
    moved["bert"]["layer"]["0"]["kernel"][1, 2] += 1e-6
    other_token = [dict(b) for b in batches]
    other_token[1]["input_ids"] = np.array([[4, 6, 0]], np.int32)
    recast = [dict(b) for b in batches]
    recast[0]["labels"] = recast[0]["labels"].astype(np.int64)
    changed = [
        fisher_cache.fisher_key({**settings, "max_grad_norm": 2.0}, params, batches, rng),
        fisher_cache.fisher_key(settings, moved, batches, rng),
        fisher_cache.fisher_key(settings, params, other_token, rng),
        fisher_cache.fisher_key(settings, params, recast, rng),
        fisher_cache.fisher_key(settings, params, batches[:1], rng),
        fisher_cache.fisher_key(settings, params, batches, jax.random.key(4)),
        fisher_cache.fisher_key(settings, params, batches, None),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_files_round_trip_exactly_and_leave_no_temporary(tmp_path):
    settings, params, batches, rng = _inputs()
    fisher = {"bert": {"layer": {"0": {"kernel": np.float32([[1e-30, 2.5, 3], [0, 7e-12, 9]])}}}}
    key = fisher_cache.fisher_key(settings, params, batches, rng)
    assert fisher_cache.load(str(tmp_path), key, params) is None
    path = fisher_cache.save(str(tmp_path), key, fisher)
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    loaded = fisher_cache.load(str(tmp_path), key, params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    got, want = loaded["bert"]["layer"]["0"]["kernel"], fisher["bert"]["layer"]["0"]["kernel"]
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_source_digest_covers_training_code_only():
    root = pathlib.Path(childtuning_trainer.__file__).parent
    assert (root / "experiments" / "protocol_reports.py").exists() and (
        root / "optimizer_chain.py"
    ).exists()
    # A training run never imports the experiments package (what the digest leaves out).
    code = (
        "import sys, train; from childtuning_trainer import loop; "
        "print(any(m.startswith('childtuning_trainer.experiments') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root.parent,
    )
    assert out.stdout.strip() == "False"
    assert len(fisher_cache.source_digest()) == 64


def test_source_digest_is_read_at_import(tmp_path):
    """A file edited while a run is going does not change the run's keys (copies, not the tree)."""
    root = pathlib.Path(childtuning_trainer.__file__).parent.parent
    for package in fisher_cache.PACKAGES:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(root / package, tmp_path / package, ignore=ignore)
    digest = (
        "from childtuning_trainer import fisher_cache as c; print(c.source_digest(), c.__file__)"
    )
    edit = (
        "import pathlib; p = pathlib.Path('childtuning_trainer/optimizer_chain.py'); "
        "p.write_text(p.read_text() + '# edited\\n'); "
    )

    def run(code: str) -> list[str]:
        command = [sys.executable, "-c", code]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path)
        return out.stdout.split()

    imported_then_edited = run(digest.replace("; print(", f"; {edit}print("))
    assert imported_then_edited[1].startswith(str(tmp_path))  # the copy, not this checkout
    assert imported_then_edited[0] == fisher_cache.source_digest()  # the unedited sources
    assert run(digest)[0] != imported_then_edited[0]  # a new process reads the edit
