"""Resume after a SIGKILL at any moment: at a random moment, and inside a checkpoint write (its
folder written but not committed). The resumed run ends with the params, eval history and
metrics log of an uninterrupted run, bit for bit; a half-written checkpoint is never loaded.
``tools/kill_resume_repeat.py`` repeats the trials (20 by default, and with two processes)."""

import os
import random
import sys

import pytest
from kill_trials import (
    SETTINGS,
    env,
    flags,
    kill_at_random,
    kill_in_write,
    kill_one_process,
    outcome,
    resume_launched,
    same_outcome,
)

from childtuning_trainer import loop

pytestmark = pytest.mark.needs_glue


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(base_config):
    """``make_config(model, out, **overrides)``: ChildTuning-D with the trials' ``SETTINGS``."""

    def make(model, out, **overrides):
        where = dict(model=model, output_dir=str(out), mode="D")
        return base_config(**{**SETTINGS, **where, **overrides})

    return make


@pytest.fixture(scope="module")
def reference(workdir, tiny_model, make_config):
    """The uninterrupted run (in this process: the same programs as train.py's)."""
    results, _ = loop.train_and_evaluate(make_config(tiny_model, workdir / "reference"))
    return outcome(str(workdir / "reference")), results["train_time_s"] + results["eval_time_s"]


def _resume(make_config, tiny_model, out, capsys):
    capsys.readouterr()
    loop.train_and_evaluate(make_config(tiny_model, out, resume=True))
    printed = capsys.readouterr().out
    assert not [n for n in os.listdir(out / "checkpoints") if "tmp" in n]  # cleaned up
    return printed


# in_write (a kill inside a checkpoint write) in make test-slow: the 12-minute budget.
@pytest.mark.parametrize("how", ["random", pytest.param("in_write", marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bit_exact(reference, workdir, tiny_model, make_config, capsys, how):
    expected, span = reference
    rng = random.Random(os.environ.get("CT_KILL_SEED", "0") + how)
    out = workdir / how
    if how == "random":
        command = [sys.executable, "train.py", *flags(tiny_model, str(out), mode="D")]
        kill = kill_at_random(command, str(out), rng, max(span, 1.0), env())
    else:
        kill = kill_in_write(tiny_model, str(out), rng)
        assert kill.temporary, "the kill came inside a write: an uncommitted folder is left"
        with open(os.path.join(out, "checkpoints", kill.temporary[0], "_CHECKPOINT_METADATA")):
            pass  # (its files were being written)
    printed = _resume(make_config, tiny_model, out, capsys)
    if kill.committed:  # resumed from the newest complete checkpoint, never a temporary one
        assert f"Resuming from step {kill.committed[-1]} " in printed
    assert same_outcome(outcome(str(out)), expected), kill


@pytest.mark.slow  # about 4 minutes on 2 cores
def test_sigkill_of_one_process_then_resume_is_bit_exact(workdir, tiny_model):
    """2 processes x 2 devices: one is SIGKILLed, the launcher stops the other; the resumed run
    ends as an uninterrupted 2 x 2 run, bit for bit."""
    reference_dir, out = workdir / "two_reference", workdir / "two_killed"
    resume_launched(tiny_model, str(reference_dir), str(workdir / "logs_ref"))
    kill = kill_one_process(tiny_model, str(out), random.Random(0), 3.0, str(workdir / "logs"))
    resume_launched(tiny_model, str(out), str(workdir / "logs"))
    assert same_outcome(outcome(str(out)), outcome(str(reference_dir))), kill
