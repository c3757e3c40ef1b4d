"""Run groups: runs differing in seed, learning rate and mode (vanilla with D), trained as one
vmapped program, equal the same runs trained alone: the same batches in the same order, per-step
losses to 1e-5, the same D masks, dev metrics within 0.002, with dropout off and with the model's
own dropout; one device or two (``jit``); a killed group resumes every run as uninterrupted; the
flat update equals the per-leaf one; an XLNet group that cannot be exact is refused. Not
bitwise: a vmapped step batches the runs' matmuls and a step pads a run's batch to the group's
longest bucket, so XLA sums in another order."""

import functools
import json

import jax
import numpy as np
import pytest

from childtuning_jax import ChildTuningFState
from childtuning_trainer import (
    group_loop,
    group_setup,
    input_pipeline,
    loop,
    optimizer_chain,
    run_groups,
    settings,
    tasks,
)

pytestmark = pytest.mark.needs_glue
# CoLA: 40 examples in global batches of 8: 5 steps an epoch, 20 steps in 4 epochs.
RUN = dict(
    task="cola",  # short sentences: the runs' own bucket lengths differ from step to step
    max_train_samples=40,
    max_eval_samples=24,
    num_train_epochs=4,
    per_device_batch_size=8,
    num_devices=1,
    dropout=0.0,
    log_every_steps=1,
    checkpoint_every_steps=3,
    keep_checkpoints=2,
    tensorboard=False,
    save_model=False,
    parallelism="jit",
)
# Seeds, learning rates, reserve_p and modes (vanilla and D) mixed in one group.
MEMBERS = [
    dict(seed=42, learning_rate=1e-3, mode="D"),
    dict(seed=52, learning_rate=5e-4, mode="vanilla"),
    dict(seed=57, learning_rate=1e-3, mode="D", reserve_p=0.2),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("groups")


@pytest.fixture(scope="module")
def make_config(run_config, tiny_checkpoint):
    return lambda out, **overrides: run_config(tiny_checkpoint(), out, **{**RUN, **overrides})


def member_configs(make_config, group_dir, **overrides):
    base = make_config(group_dir, **overrides)
    return run_groups.member_configs(
        base, [{**m, "output_dir": str(group_dir / f"run{i}")} for i, m in enumerate(MEMBERS)]
    )


@pytest.fixture(scope="module")
def alone(workdir, make_config):
    """Each member trained alone (``train_and_evaluate``), computed once."""

    @functools.cache
    def _alone(i, dropout=0.0):
        out = workdir / (f"alone{i}" if dropout == 0.0 else f"alone{i}_dropout")
        results, params = loop.train_and_evaluate(make_config(out, **MEMBERS[i], dropout=dropout))
        return results, out, params

    return _alone


def losses(out):
    with open(out / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def read(out, name):
    with open(out / name) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def group(workdir, make_config):
    """The three members trained as one group on ``num_devices`` devices, once each."""

    @functools.cache
    def _group(num_devices, dropout=0.0):
        group_dir = workdir / (f"group_{num_devices}" + ("" if dropout == 0.0 else "_dropout"))
        per_device = 8 // num_devices
        configs = member_configs(
            make_config,
            group_dir,
            num_devices=num_devices,
            per_device_batch_size=per_device,
            dropout=dropout,
        )
        finished = group_loop.train_group(configs, str(group_dir), loop.results_of)
        return finished, group_dir

    return _group


def test_group_batches_are_each_runs_own(workdir, make_config):
    configs = member_configs(make_config, workdir / "batches")
    group = group_setup.prepare_group(configs, str(workdir / "batches"))
    padded = 0
    for epoch in range(2):
        alone = [run.epoch_batches(epoch) for run in group.runs]
        for together in group_loop.epoch_batches(group, epoch, 0):
            length = together["input_ids"].shape[2]
            for r, own in enumerate(next(a) for a in alone):
                mine = {k: v[:, r] for k, v in together.items()}
                width = own["input_ids"].shape[1]
                assert width <= length
                for key, value in own.items():
                    cut = width if value.ndim > 1 else None
                    np.testing.assert_array_equal(mine[key][..., :cut], value)
                assert not mine["attention_mask"][:, width:].any()  # only padding added
                padded += width < length
        assert all(next(a, None) is None for a in alone)
    assert padded  # the runs' own lengths differ at some step


def padded_steps(group) -> int:
    """How many (step, run) batches the group pads longer than the run's own."""
    padded = 0
    for epoch in range(group.runs[0].settings.num_train_epochs):
        alone = [run.epoch_batches(epoch) for run in group.runs]
        for together in group_loop.epoch_batches(group, epoch, 0):
            padded += sum(
                next(a)["input_ids"].shape[1] < together["input_ids"].shape[2] for a in alone
            )
    return padded


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 2])
def test_group_equals_runs_alone(group, alone, num_devices):
    assert_equal_alone(*group(num_devices), alone)


@pytest.mark.slow
def test_group_with_dropout_equals_runs_alone(group, alone, workdir, make_config):
    """With the model's own dropout rates (the tiny BERT's 0.1) the masks of a run's positions do
    not depend on how far the group pads its batch, so the group still equals the runs alone."""
    configs = member_configs(make_config, workdir / "dropout_batches", dropout=None)
    assert padded_steps(group_setup.prepare_group(configs, str(workdir / "dropout_batches")))
    assert_equal_alone(*group(1, None), functools.partial(alone, dropout=None))


def assert_equal_alone(finished, group_dir, alone):
    for i, (results, params) in enumerate(finished):
        out = group_dir / f"run{i}"
        reference, ref_out, ref_params = alone(i)
        assert read(out, "results.json") == json.loads(json.dumps(results))
        assert set(results) - set(reference) == {"group_size"}
        for key in ("mode", "seed", "learning_rate", "reserve_p", "steps", "config"):
            if key == "config":  # the same but for the folder and the devices
                layout = ("output_dir", "num_devices", "per_device_batch_size")
                assert {**results[key], **dict.fromkeys(layout)} == {
                    **reference[key],
                    **dict.fromkeys(layout),
                }
            else:
                assert results[key] == reference[key]
        steps_alone, steps_group = losses(ref_out), losses(out)
        assert [s for s, _ in steps_group] == [s for s, _ in steps_alone] == list(range(1, 21))
        np.testing.assert_allclose(
            [v for _, v in steps_group], [v for _, v in steps_alone], rtol=1e-5
        )
        for h_group, h_alone in zip(results["history"], reference["history"], strict=True):
            for name, value in h_alone["eval"].items():
                assert abs(h_group["eval"][name] - value) <= 0.002
        if MEMBERS[i]["mode"] == "D":
            kept = lambda folder: read(folder, "mask_summary.json")["kept_fraction_per_parameter"]
            assert kept(out) == kept(ref_out)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_killed_group_resumes_every_run(group, workdir, make_config):
    finished, _ = group(1)
    group_dir = workdir / "killed"
    configs = member_configs(make_config, group_dir, stop_after_steps=7)
    assert group_loop.train_group(configs, str(group_dir), loop.results_of) is None
    configs = member_configs(make_config, group_dir, resume=True)
    resumed = group_loop.train_group(configs, str(group_dir), loop.results_of)
    for i, ((results, params), (expected, expected_params)) in enumerate(
        zip(resumed, finished, strict=True)
    ):
        assert results["history"] == expected["history"]
        assert losses(group_dir / f"run{i}") == losses(workdir / "group_1" / f"run{i}")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True):
            np.testing.assert_array_equal(a, b)


def test_groups_refuse_settings_they_cannot_share(make_config, workdir):
    configs = member_configs(make_config, workdir / "bad")
    configs[1].max_seq_length = 16
    with pytest.raises(ValueError, match="shares config.max_seq_length"):
        group_setup.prepare_group(configs, str(workdir / "bad"))
    configs = member_configs(make_config, workdir / "bad")
    configs[0].mode = "F"
    with pytest.raises(ValueError, match="F runs form their own group"):
        group_setup.prepare_group(configs, str(workdir / "bad"))
    with pytest.raises(ValueError, match="group_seeds"):
        run_groups.parse_seeds("42,x")


def test_an_f_group_keeps_each_runs_key_and_learning_rate(make_config, workdir):
    base = make_config(workdir / "f_group", mode="F")
    overrides = [dict(seed=42, learning_rate=1e-3), dict(seed=52, learning_rate=5e-4)]
    configs = run_groups.member_configs(
        base, [{**o, "output_dir": str(workdir / f"f{i}")} for i, o in enumerate(overrides)]
    )
    group = group_setup.prepare_group(configs, str(workdir / "f_group"))
    state, _ = group_setup.initial_group_state(group)
    assert group.uniform is None  # no D mask in an F group
    np.testing.assert_array_equal(state.opt_state.learning_rate, np.float32([1e-3, 5e-4]))
    for r, run in enumerate(group.runs):
        alone = optimizer_chain.run_optimizer(run.settings, run.params, run.schedule)
        (key,) = [s.key for s in alone.init(run.params) if isinstance(s, ChildTuningFState)]
        (stacked,) = [s.key for s in state.opt_state.inner if isinstance(s, ChildTuningFState)]
        np.testing.assert_array_equal(stacked[r], key)


@pytest.mark.slow  # the default suite's variant: test_group_interruption.py
def test_a_flat_group_equals_the_group_per_leaf(workdir, make_config):
    """``flat_update`` (the default on accelerators) under ``vmap``, for a vanilla and a D run
    (other seeds, learning rates and ``reserve_p``): each run's own mask, learning rate and key,
    the same losses as the per-leaf chain to 1e-6."""
    members = MEMBERS[1:]
    logged = {}
    for flat in (False, True):
        group_dir = workdir / f"flat_{flat}"
        base = make_config(group_dir, flat_update=flat, stop_after_steps=4)
        folders = [{**m, "output_dir": str(group_dir / f"run{i}")} for i, m in enumerate(members)]
        configs = run_groups.member_configs(base, folders)
        assert group_loop.train_group(configs, str(group_dir), loop.results_of) is None
        logged[flat] = [losses(group_dir / f"run{i}") for i in range(len(members))]
    for flat, per_leaf in zip(logged[True], logged[False], strict=True):
        assert [s for s, _ in flat] == [s for s, _ in per_leaf] == [1, 2, 3, 4]
        np.testing.assert_allclose([v for _, v in flat], [v for _, v in per_leaf], rtol=1e-6)
    assert logged[True][0] != logged[True][1]


def test_an_xlnet_group_with_dropout_is_refused_unless_its_runs_pad_alike(
    run_config, tiny_checkpoint, workdir
):
    """XLNet draws dropout by position in the padded tensor: a group of runs whose batches pad to
    different lengths is refused in one line; without dropout, or padded to the maximum, not."""
    base = run_config("", workdir, **RUN)
    train, dev = input_pipeline.load_examples(
        settings.data_settings(base), base.seed, tasks.get_task("cola")
    )
    xlnet = tiny_checkpoint("xlnet", texts=tuple(t for s in [train, *dev] for t in s.text_a))

    def prepare(name, **overrides):
        config = run_config(xlnet, workdir / name, **{**RUN, **overrides})
        folders = [dict(seed=s, output_dir=str(workdir / name / f"seed_{s}")) for s in (42, 52)]
        configs = run_groups.member_configs(config, folders)
        return group_setup.prepare_group(configs, str(workdir / name))

    with pytest.raises(ValueError, match=r"\(xlnet\) draws dropout by position .* alone\.$"):
        prepare("xlnet_dropout", dropout=None)
    exact = {"no_dropout": dict(dropout=0.0), "max_length": dict(padding="max_length")}
    for name, overrides in exact.items():
        group = prepare(f"xlnet_{name}", **{"dropout": None, **overrides})
        lengths = [group_setup.padded_lengths(run) for run in group.runs]
        assert (name == "max_length") == all(np.array_equal(lengths[0], x) for x in lengths)
