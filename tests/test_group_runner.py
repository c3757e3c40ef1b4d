"""The sweep's run groups: which runs share a process, the memory fit, and a grouped sweep whose
runs are recorded under their own run ids; ``train.py``'s ``group_seeds``; the compile report."""

import json
import os

import pytest

from childtuning_trainer import compilation, loop
from childtuning_trainer.experiments import group_runner, store
from childtuning_trainer.experiments.store import RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runs_that_can_share_a_program_are_packed_together():
    specs = [
        RunSpec.of(task="rte", mode=m, seed=s, learning_rate=lr)
        for m in ("vanilla", "D", "F")
        for s in (42, 52)
        for lr in (1e-5, 2e-5)
    ]
    specs.append(RunSpec.of(task="mrpc", mode="D", seed=42))
    specs.append(RunSpec.of(task="rte", mode="F", seed=42, reserve_p=0.2))
    groups = group_runner.pack(specs, 5)
    assert sorted(len(g) for g in groups) == [1, 1, 3, 4, 5]
    assert sorted(s.run_id for g in groups for s in g) == sorted(s.run_id for s in specs)
    for group in groups:
        assert len({(s.get("task"), s.get("mode") == "F", s.get("reserve_p")) for s in group}) == 1
    assert group_runner.pack(specs, 1) == [[s] for s in specs]  # one run a process, as before


def test_memory_fit_shrinks_or_refuses_a_group(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    per_run = group_runner.run_bytes(str(tmp_path))
    assert per_run == 4031 and group_runner.run_bytes(str(tmp_path), "recadam") == 5031
    assert group_runner.run_bytes(str(tmp_path / "missing")) is None
    assert group_runner.fit_size(10, per_run, 100_000) == 10 and not capsys.readouterr().out
    assert group_runner.fit_size(30, per_run, 100_000) == 19
    assert "group_size 30 -> 19" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no group fits"):
        group_runner.fit_size(4, per_run, 1000)
    assert group_runner.default_group_size("cpu") == 1
    assert group_runner.default_group_size("gpu") > 1


def test_compilation_cache_folder_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compilation.cache_dir("") == str(tmp_path / "env")
    assert compilation.cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert compilation.cache_dir("none") is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compilation.cache_dir("").endswith(os.path.join(".cache", "childtuning_jax", "xla"))


@pytest.mark.slow
@pytest.mark.needs_glue
def test_group_seeds_write_a_folder_per_seed(tiny_checkpoint, run_config, tmp_path):
    config = run_config(
        tiny_checkpoint(),
        tmp_path,
        max_train_samples=16,
        max_eval_samples=8,
        num_train_epochs=1,
        per_device_batch_size=8,
        num_devices=1,
        group_seeds="42,52",
        tensorboard=False,
    )
    outcome = loop.train_and_evaluate(config)
    assert [r["seed"] for r, _ in outcome] == [42, 52]
    for seed in (42, 52):
        with open(tmp_path / f"seed_{seed}" / "results.json") as f:
            results = json.load(f)
        assert results["seed"] == seed and results["group_size"] == 2
        assert results["config"]["group_seeds"] == ""  # the config of the run alone
        assert results["compiled_programs"] > 0 and "peak_device_memory_bytes" in results
        assert (tmp_path / f"seed_{seed}" / "model" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.needs_glue
def test_grouped_sweep_records_each_run_under_its_id(tiny_checkpoint, glue_dir, tmp_path):
    specs = [
        RunSpec.of(task="rte", mode=m, seed=s, max_train_samples=16)
        for m, s in (("D", 42), ("vanilla", 52))
    ]
    kwargs = dict(
        config_file=os.path.join(REPO, "configs", "glue.py"),
        train_script=os.path.join(REPO, "train.py"),
        results_file=str(tmp_path / "runs.jsonl"),
        work_dir=str(tmp_path / "work"),
        cache_dir=None,
        settings=dict(
            data_dir=glue_dir,
            model=tiny_checkpoint(),
            max_seq_length=32,
            max_eval_samples=8,
            num_train_epochs=1,
            per_device_batch_size=8,
            tensorboard=False,
        ),
    )
    records, failures = group_runner.run_all_grouped(specs, 4, **kwargs)
    assert failures == []
    assert [r["run_id"] for r in records] == [s.run_id for s in specs]
    for spec, record in zip(specs, records, strict=True):
        assert record["seed"] == spec.get("seed") and record["mode"] == spec.get("mode")
        assert record["group_size"] == 2 and record["train_loss"]
        assert os.path.exists(tmp_path / "work" / spec.run_id / "results.json")
    assert store.load_results(specs, kwargs["results_file"]) == records
    assert group_runner.run_all_grouped(specs, 4, **kwargs) == (records, [])  # all finished


def test_group_command_lists_each_runs_own_settings(tmp_path):
    specs = [RunSpec.of(task="rte", seed=42), RunSpec.of(task="rte", seed=52, learning_rate=1e-4)]
    kwargs = dict(work_dir=str(tmp_path), settings={"data_dir": "/glue"})
    command, folders = group_runner.group_command(specs, str(tmp_path / "g"), kwargs)
    with open(tmp_path / "g" / "group_runs.json") as f:
        runs = json.load(f)
    assert runs == [
        {"seed": 42, "output_dir": os.path.abspath(folders[0])},
        {"seed": 52, "learning_rate": 1e-4, "output_dir": os.path.abspath(folders[1])},
    ]
    assert folders == [str(tmp_path / s.run_id) for s in specs]
    assert "--config.task=rte" in command and "--config.data_dir=/glue" in command
    assert not [c for c in command if c.startswith(("--config.seed", "--config.learning_rate"))]
