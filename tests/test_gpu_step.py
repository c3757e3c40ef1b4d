"""Smoke tests of the GPU step benchmark (benchmarks/gpu_step.py) on the CPU: tiny shapes, every
section recorded, the time box kept; and the PyTorch foreach baseline's Child-Tuning masks."""

import glob
import json

import numpy as np
import pytest

from benchmarks import gpu_step, step_parts, workloads

torch = pytest.importorskip("torch")


def _record(out_dir):
    (path,) = glob.glob(str(out_dir / "gpu_step-*.json"))
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow  # about 20 tiny compiles
def test_smoke_run_records_every_section(tmp_path):
    assert gpu_step.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1200"]) == 0
    record = _record(tmp_path)
    assert record["complete"] and record["skipped"] == {}
    results = record["results"]
    assert set(results) == set(gpu_step.SECTIONS)
    step = results["step"]
    for dtype in ("float32", "bfloat16"):
        assert set(step[dtype]["ours_s"]) == set(workloads.MODES)
        assert all(t > 0 for t in step[dtype]["ours_s"].values())
    assert set(step["float32"]["pytorch_s"]) == set(workloads.MODES)
    update = results["update"]
    assert update["hbm_limit_s"] > 0 and "chain D per leaf" in update["times_s"]
    assert ("chain D flat" in update["times_s"]) == step_parts.flat_available()
    assert ("chain D held flat" in update["times_s"]) == step_parts.held_available()
    assert all(row["step_s"] > 0 for row in results["mfu"].values() if isinstance(row, dict))
    assert len([k for k in results["trainer"] if "fetch every" in k]) == 8


@pytest.mark.slow  # about 10 tiny compiles
def test_smoke_run_with_the_flat_chain_times_params_held_flat(tmp_path, monkeypatch):
    held, ours = [], step_parts.ours

    def spy(mode, *args):
        tx, layout, params = ours(mode, *args)
        held.append((mode, layout is not None))
        return tx, layout, params

    monkeypatch.setattr(step_parts, "ours", spy)
    argv = ["--smoke", "--out", str(tmp_path), "--flat", "on", "--only", "mfu,trainer"]
    assert gpu_step.main([*argv, "--budget-s", "1200"]) == 0
    assert set(held) == {("vanilla", True), ("D", True)}  # the trainer's form: params held flat
    results = _record(tmp_path)["results"]
    assert all(row["step_s"] > 0 for row in results["mfu"].values() if isinstance(row, dict))
    assert all(t > 0 for k, t in results["trainer"].items() if "fetch every" in k)


def test_time_box_skips_and_writes(tmp_path):
    assert gpu_step.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    record = _record(tmp_path)
    assert record["complete"] and record["results"] == {}
    assert set(record["skipped"]) == set(gpu_step.SECTIONS)


def test_foreach_baseline_masks_gradients_as_the_official_optimizer():
    from benchmarks import torch_foreach

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    weight, bias = model[0].weight, model[0].bias
    mask = {weight: torch.tensor(np.random.default_rng(0).random((3, 4)) < 0.5)}
    trainer = torch_foreach.ForeachTrainer(model, ("D", "F"), mask)
    weight.grad, bias.grad = torch.ones_like(weight), torch.ones_like(bias)
    trainer._child_tuning("D")
    assert torch.equal(weight.grad, mask[weight].float()) and torch.equal(bias.grad, torch.ones(3))
    wide = torch.nn.Sequential(torch.nn.Linear(4, 200, bias=False))  # F: every gradient
    trainer = torch_foreach.ForeachTrainer(wide, ("F",))
    weight = wide[0].weight
    weight.grad = torch.ones_like(weight)
    trainer._child_tuning("F")
    values = np.unique(weight.grad.numpy())
    np.testing.assert_allclose(values, [0.0, 1 / workloads.RESERVE_P], rtol=1e-6)
    assert abs((weight.grad > 0).float().mean().item() - workloads.RESERVE_P) < 0.06
