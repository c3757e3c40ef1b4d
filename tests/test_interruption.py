"""Nothing is lost when a run is stopped: SIGINT and SIGTERM finish the step, checkpoint, print
the command that resumes and exit with 130 / 143; a damaged newest checkpoint is set aside with a
warning and the run resumes from the one before. Either way the resumed run ends as an
uninterrupted one, bit for bit (``tools/kill_trials.outcome``)."""

import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from kill_trials import (
    REPO,
    SETTINGS,
    SLOW_TRAIN,
    flags,
    outcome,
    same_outcome,
    signal_then_resume,
)

from childtuning_trainer import checkpoints, interruption, loop, outputs, settings

pytestmark = pytest.mark.needs_glue
# The trials' run (6 steps, 3 per epoch) in mode F (no Fisher pass to wait for), checkpointed at
# the ends of epochs only: a mid-epoch checkpoint is the signal's.
RUN = dict(mode="F", checkpoint_every_steps=100)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(base_config):
    def make(model, out, **overrides):
        where = dict(model=model, output_dir=str(out))
        return base_config(**{**SETTINGS, **RUN, **where, **overrides})

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, make_config):
    """The uninterrupted run's outcome."""
    out = tmp_path_factory.mktemp("interruption") / "reference"
    loop.train_and_evaluate(make_config(tiny_model, out))
    return outcome(str(out))


def env() -> dict[str, str]:
    """This process's XLA flags and compilation cache (conftest's): train.py compiles the same
    programs as the reference run in this process."""
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def _logged_steps(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.parametrize(
    "signum, status",
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)  # SIGINT's handling is the same code: in this process below, here in `make test-slow`
def test_a_signal_checkpoints_and_the_printed_command_resumes(
    reference, tiny_model, tmp_path, signum, status
):
    out = str(tmp_path / "run")
    logged = os.path.join(out, "metrics.jsonl")
    step, printed = signal_then_resume(flags(tiny_model, out, **RUN), out, logged, signum, env())
    assert status == 128 + signum
    assert f"Resuming from step {step}" in printed
    assert same_outcome(outcome(out), reference)


def test_ctrl_c_in_this_process_checkpoints_and_the_run_resumes(
    reference, tiny_model, tmp_path, make_config, monkeypatch
):
    """SIGINT (Ctrl-C) during ``train_and_evaluate``: the step finishes, a checkpoint is written,
    :class:`~childtuning_trainer.interruption.Interrupted` says where (exit status 130), Python's
    handler before the run is back afterwards, and resuming ends as the uninterrupted run."""
    steps = outputs.TrainingLog.steps

    def slow_steps(self, losses, *args):  # a signal sent after the first logged step lands mid-run
        if not getattr(slow_steps, "sent", False):
            slow_steps.sent = True
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        time.sleep(0.3 * len(losses))
        return steps(self, losses, *args)

    monkeypatch.setattr(outputs.TrainingLog, "steps", slow_steps)
    before = signal.getsignal(signal.SIGINT)  # (an xdist worker ignores SIGINT)
    out = tmp_path / "run"
    with pytest.raises(interruption.Interrupted) as stopped:
        loop.train_and_evaluate(make_config(tiny_model, out))
    assert stopped.value.signum == signal.SIGINT and stopped.value.exit_status == 130
    step = stopped.value.step
    assert 1 <= step < 6 and str(step) in os.listdir(out / "checkpoints")
    assert signal.getsignal(signal.SIGINT) == before  # the handler before the run is back
    monkeypatch.undo()
    loop.train_and_evaluate(make_config(tiny_model, out, resume=True))
    assert same_outcome(outcome(str(out)), reference)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumed(
    reference, tiny_model, tmp_path, make_config, capsys
):
    out = tmp_path / "run"
    every_step = dict(checkpoint_every_steps=1, keep_checkpoints=2)
    assert (
        loop.train_and_evaluate(make_config(tiny_model, out, stop_after_steps=5, **every_step))
        is None
    )
    newest = out / "checkpoints" / "4"  # 3 and 4 kept; step 5 is lost (as if killed)
    data = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])  # truncated, as by a full disk
    capsys.readouterr()

    loop.train_and_evaluate(make_config(tiny_model, out, resume=True, **every_step))
    printed = capsys.readouterr()
    assert f"warning: checkpoint {newest} cannot be read (" in printed.err
    assert "Resuming from step 3" in printed.out
    assert (out / "checkpoints" / "4.corrupt").is_dir()
    assert same_outcome(outcome(str(out)), reference)


def test_no_readable_checkpoint_is_one_error_line(tmp_path, base_config, capsys):
    config = base_config(output_dir=str(tmp_path), keep_checkpoints=2)
    manager = checkpoints.checkpoint_manager(settings.output_settings(config))
    state = {"w": np.arange(4.0, dtype=np.float32)[None]}  # one device's copy
    checkpoints.save_checkpoint(manager, state, {"step": 1})
    manager.wait_until_finished()
    (tmp_path / "checkpoints" / "1" / "meta" / "metadata").write_text("{")
    template = lambda meta: jax.tree.map(lambda x: x[0], state)  # noqa: E731
    with pytest.raises(ValueError, match="No checkpoint in .* can be read"):
        checkpoints.restore_newest_readable(manager, template)
    assert "warning: checkpoint" in capsys.readouterr().err
    assert checkpoints.restore_newest_readable(manager, template) is None  # set aside
    manager.close()


def test_the_resume_command_replaces_resume_and_overwrite(monkeypatch):
    monkeypatch.delenv(interruption.COMMAND_ENV, raising=False)
    argv = ["train.py", "--config=configs/rte.py", "--config.overwrite=true", "--config.seed=3"]
    assert interruption.resume_command(argv) == (
        "train.py --config=configs/rte.py --config.seed=3 --config.resume=True"
    )
    monkeypatch.setattr(sys, "argv", ["train.py", "--config.resume=True", "--config.x=a b"])
    assert interruption.resume_command() == shlex.join(
        [sys.executable, "train.py", "--config.x=a b", "--config.resume=True"]
    )
    monkeypatch.setenv(interruption.COMMAND_ENV, "python launch.py -- --config.mode=D")
    assert interruption.resume_command() == (
        "python launch.py -- --config.mode=D --config.resume=True"
    )


@pytest.mark.slow  # four two-process runs: several minutes on 2 cores
def test_a_signal_stops_every_process_of_a_launched_run_at_the_same_step(tiny_model, tmp_path):
    """launch.py 2 x 2: SIGTERM to the launcher reaches both processes, which agree on the step,
    checkpoint it together and exit 143; the printed launch command resumes the run to the end
    of an uninterrupted 2 x 2 run, bit for bit."""
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)

    def launch(out: str, *extra: str) -> list[str]:
        logs = f"--logs={tmp_path / 'logs'}"
        return [sys.executable, "launch.py", logs, f"--script={script}", "--", *extra]

    reference = str(tmp_path / "reference")
    done = subprocess.run(
        launch(reference, *flags(tiny_model, reference, **RUN)),
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    out = str(tmp_path / "run")
    launcher = subprocess.Popen(
        launch(out, *flags(tiny_model, out, **RUN)),
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while _logged_steps(out) < 1 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 143, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if line.startswith("interrupted at step"))
    step = int(line.split()[3].rstrip(";"))
    assert str(step) in os.listdir(os.path.join(out, "checkpoints"))
    log_1 = (tmp_path / "logs" / "process_1.log").read_text()
    assert f"interrupted at step {step};" in log_1  # the same step in the other process
    command = line.split("resume with: ", 1)[1]
    resumed = subprocess.run(
        shlex.split(command), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_outcome(outcome(out), outcome(reference))
