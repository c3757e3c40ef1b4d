"""A run group stops and resumes as a run does. SIGINT and SIGTERM finish the step, checkpoint the
group and say how to resume (``train.py`` exits 130 / 143); a SIGKILL just after the Fisher pass,
just after a mid-epoch checkpoint or just after an epoch's evaluation line, then resume, ends
every run with the params, eval history and metrics log of an uninterrupted group, bit for bit
(``tools/kill_trials.outcome``); two processes (``launch.py``, the ``jit`` layout) train a group
as one process does; and with the flat update (the default on accelerators) a group logs the
per-leaf group's losses (a mixed group's: ``test_run_groups.py``)."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from kill_trials import REPO, SETTINGS, flags, outcome, same_outcome, signal_then_resume

from childtuning_trainer import interruption, loop, outputs

pytestmark = pytest.mark.needs_glue
SEEDS = (42, 52)
# Two ChildTuning-D runs (a Fisher pass each) on the trials' 6 steps (3 per epoch, a checkpoint
# each), data-parallel over the four test devices with the jit layout; no TensorBoard or
# predictions (not compared).
GROUP = dict(
    group_seeds=",".join(map(str, SEEDS)),
    mode="D",
    parallelism="jit",
    tensorboard=False,
    write_predictions=False,
    flat_update=False,  # per leaf (the CPU's default), against a flat group below
)
# train.py, SIGKILLed at KILL_MOMENT: just after the group's Fisher pass (no mask written yet),
# just after step 4's checkpoint is committed (mid-epoch 2), or just after the first run's line
# of epoch 1's evaluation (the other run's line and the epoch's checkpoint not yet written).
KILLED_TRAIN = """
import os, runpy, signal, sys
from childtuning_trainer import group_loop, group_setup, outputs
moment = os.environ["KILL_MOMENT"]
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if moment == "fisher":
    fisher = group_setup.group_fisher
    group_setup.group_fisher = lambda *a: die(fisher(*a))
elif moment == "checkpoint":
    save = group_loop.save
    def save_then_die(group, state, progresses, logs):
        save(group, state, progresses, logs)
        group.manager.wait_until_finished()
        if progresses[0].step == 4:
            die()
    group_loop.save = save_then_die
else:
    evaluation = outputs.TrainingLog.evaluation
    outputs.TrainingLog.evaluation = lambda self, *a: die(evaluation(self, *a))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""
RESUMED_FROM = {"fisher": None, "checkpoint": 4, "evaluation": 2}  # keep_checkpoints=2


def env(**extra: str) -> dict[str, str]:
    """This process's XLA flags and compilation cache (conftest's): train.py compiles the same
    programs as the reference group in this process."""
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **extra)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("group_interruption")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(base_config, tiny_model):
    def make(out, **overrides):
        where = dict(model=tiny_model, output_dir=str(out))
        return base_config(**{**SETTINGS, **GROUP, **where, **overrides})

    return make


def outcomes(group_dir) -> dict[int, dict]:
    return {seed: outcome(str(group_dir / f"seed_{seed}")) for seed in SEEDS}


@pytest.fixture(scope="module")
def reference(workdir, make_config):
    """The uninterrupted group, in this process."""
    loop.train_and_evaluate(make_config(workdir / "reference"))
    return outcomes(workdir / "reference")


def resume(make_config, out, capsys) -> str:
    """Resumes the group in ``out`` to its end; returns what it printed."""
    capsys.readouterr()
    loop.train_and_evaluate(make_config(out, resume=True))
    return capsys.readouterr().out


def assert_same_outcomes(got: dict, expected: dict) -> None:
    for seed in SEEDS:
        assert same_outcome(got[seed], expected[seed]), seed


@pytest.mark.parametrize(
    "signum", [pytest.param(s, marks=pytest.mark.slow) for s in (signal.SIGTERM, signal.SIGINT)]
)
def test_a_signal_checkpoints_the_group_and_resume_ends_as_uninterrupted(
    reference, workdir, make_config, monkeypatch, capsys, signum
):
    out = workdir / f"signal_{signum.name}"
    interval = outputs.TrainingLog.interval

    def signalled(self, step, *args):  # the signal arrives during step 4 (mid-epoch 2)
        interval(self, step, *args)
        if step == 4 and not sent:
            sent.append(os.kill(os.getpid(), signum))

    sent: list = []
    monkeypatch.setattr(outputs.TrainingLog, "interval", signalled)
    only_epoch_ends = dict(checkpoint_every_steps=100)  # a mid-epoch checkpoint is the signal's
    with pytest.raises(interruption.Interrupted) as stopped:
        loop.train_and_evaluate(make_config(out, **only_epoch_ends))
    assert stopped.value.step == 4 and stopped.value.exit_status == 128 + signum
    assert str(stopped.value).startswith("interrupted at step 4; resume with: ")
    assert {n for n in os.listdir(out / "checkpoints") if n.isdigit()} == {"3", "4"}
    monkeypatch.undo()
    assert "Resuming the group from step 4" in resume(make_config, out, capsys)
    assert_same_outcomes(outcomes(out), reference)


@pytest.mark.parametrize(
    "moment",
    [pytest.param(m, marks=pytest.mark.slow) for m in ("fisher", "evaluation")] + ["checkpoint"],
)
def test_sigkill_of_a_group_then_resume_is_bit_exact(
    reference, workdir, tiny_model, make_config, capsys, moment
):
    out = workdir / f"killed_{moment}"
    command = [sys.executable, "-c", KILLED_TRAIN, *flags(tiny_model, str(out), **GROUP)]
    killed = subprocess.run(
        command, cwd=REPO, env=env(KILL_MOMENT=moment), capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    printed = resume(make_config, out, capsys)
    step = RESUMED_FROM[moment]
    resumed = f"Resuming the group from step {step}\n" if step else "Resuming"
    assert (resumed in printed) == (step is not None), printed
    assert_same_outcomes(outcomes(out), reference)


@pytest.mark.slow  # a train.py process, then another to resume
def test_train_py_stops_a_group_on_sigterm_and_prints_the_command_that_resumes(
    reference, workdir, tiny_model
):
    """The command line's side: exit status 143 and the resume command as the last line."""
    out = workdir / "train_py_signal"
    args = flags(tiny_model, str(out), **GROUP, checkpoint_every_steps=100)
    logged = str(out / f"seed_{SEEDS[-1]}" / "metrics.jsonl")
    step, printed = signal_then_resume(args, str(out), logged, signal.SIGTERM, env())
    assert f"Resuming the group from step {step}" in printed
    assert_same_outcomes(outcomes(out), reference)


@pytest.mark.slow  # two processes joined over gloo: about two minutes
def test_two_processes_train_a_group_as_one(reference, workdir, tiny_model):
    """launch.py 2 x 2 devices against this process's 1 x 4 (both ``jit``): every run ends with
    the same params (to 1e-6), eval history and logged steps."""
    out = workdir / "two_processes"
    command = [
        sys.executable,
        "launch.py",
        "--num_processes=2",
        "--devices_per_process=2",
        f"--logs={workdir / 'launch_logs'}",
        "--",
        *flags(tiny_model, str(out), **GROUP),
    ]
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for seed, got in outcomes(out).items():
        expected = reference[seed]
        assert got["history"] == expected["history"]
        for a, b in zip(
            jax.tree.leaves(got["params"]), jax.tree.leaves(expected["params"]), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        lines = [json.loads(x) for x in got["metrics.jsonl"].splitlines()]
        expected_lines = [json.loads(x) for x in expected["metrics.jsonl"].splitlines()]
        assert [x["step"] for x in lines] == [x["step"] for x in expected_lines]
        np.testing.assert_allclose(
            [x.get("loss", 0.0) for x in lines],
            [x.get("loss", 0.0) for x in expected_lines],
            rtol=1e-5,
        )


def test_a_flat_group_equals_the_group_per_leaf(reference, workdir, make_config):
    """``flat_update`` under ``vmap`` (each run's own D mask, key and dropout, data-parallel):
    the per-leaf group's losses to 1e-6 relative."""
    out = workdir / "flat"
    assert loop.train_and_evaluate(make_config(out, flat_update=True, stop_after_steps=4)) is None
    for seed in SEEDS:
        logged = (out / f"seed_{seed}" / "metrics.jsonl").read_text()
        flat, per_leaf = (
            [json.loads(x) for x in text.splitlines() if '"loss"' in x][:4]
            for text in (logged, reference[seed]["metrics.jsonl"])
        )
        assert [x["step"] for x in flat] == [x["step"] for x in per_leaf] == [1, 2, 3, 4]
        np.testing.assert_allclose(
            [x["loss"] for x in flat], [x["loss"] for x in per_leaf], rtol=1e-6
        )
