"""Kill-anywhere resume trials, shared by ``test_kill_resume.py`` and ``kill_resume_repeat.py``.

A trial starts ``train.py`` (or ``launch.py`` for several processes), SIGKILLs it (or one of its
processes) at a random moment or inside a checkpoint write, resumes with ``resume=true`` to the
end, and returns what the resumed run produced, to be compared with an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# $CHILDTUNING_DATA_DIR (holding glue/), else the checkout's neighbour ../shared.
DATA_ROOT = os.environ.get("CHILDTUNING_DATA_DIR") or os.path.join(REPO, "..", "shared")
GLUE_DIR = os.path.join(DATA_ROOT, "glue")

# Runs train.py, SIGKILLing this process when orbax finalises checkpoint number KILL_AT (counted
# from 1): the state and the JSON are then written into the temporary folder, not yet committed.
IN_WRITE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
calls, kill_at = [0], int(os.environ["KILL_AT"])
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def dying_finalize(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = dying_finalize
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""

# train.py, each step slowed down so that a signal lands mid-run.
SLOW_TRAIN = """
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())  # this checkout's packages, also when run as a script file
from childtuning_trainer import outputs
steps = outputs.TrainingLog.steps
outputs.TrainingLog.steps = lambda self, losses, *a: (
    time.sleep(0.3 * len(losses)), steps(self, losses, *a))[1]
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""

SETTINGS = dict(  # 24 examples in batches of 8: 3 steps per epoch, 6 in all, a checkpoint each
    task="rte",
    data_dir=GLUE_DIR,
    max_train_samples=24,
    max_eval_samples=16,
    max_seq_length=32,
    num_train_epochs=2,
    learning_rate=1e-3,
    weight_decay=0.0,
    per_device_batch_size=2,
    log_every_steps=1,
    checkpoint_every_steps=1,
    keep_checkpoints=2,
)
NUM_CHECKPOINTS = 6


def flags(model: str, output_dir: str, **overrides) -> list[str]:
    settings = dict(SETTINGS, model=model, output_dir=output_dir, **overrides)
    return ["--config=glue", *(f"--config.{k}={v}" for k, v in settings.items())]


def env(devices: int = 4) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


@dataclasses.dataclass
class Kill:
    """What a trial's kill left behind."""

    how: str  # "random" or "in_write"
    after_s: float | None  # seconds after start (None: the run ended first)
    committed: list[int]  # checkpoint steps on disk after the kill
    temporary: list[str]  # uncommitted checkpoint folders after the kill
    victim: int = 0  # the killed process (multi-process trials)


def _checkpoint_dirs(output_dir: str) -> tuple[list[int], list[str]]:
    path = os.path.join(output_dir, "checkpoints")
    names = os.listdir(path) if os.path.isdir(path) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def wait_for_training(output_dir: str, process: subprocess.Popen, timeout: float = 600) -> None:
    """Returns once the first checkpoint write has begun (training is under way)."""
    path = os.path.join(output_dir, "checkpoints")
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(path) and os.listdir(path):
            return
        time.sleep(0.01)


def kill_at_random(
    command: list[str],
    output_dir: str,
    rng: random.Random,
    span_s: float,
    environ: dict,
    startup_s: float | None = None,
) -> Kill:
    """Starts ``command``; SIGKILLs it at a random moment: one time in five anywhere in its first
    ``startup_s`` (default ``span_s``) seconds of start-up (loading, the Fisher pass), otherwise
    within ``span_s`` after the first checkpoint write begins, while checkpoints are written at
    every step."""
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if rng.random() < 0.2:
        delay = rng.uniform(0, span_s if startup_s is None else startup_s)
    else:
        wait_for_training(output_dir, process)
        delay = time.monotonic() - start + rng.uniform(0, span_s)
    while process.poll() is None and time.monotonic() - start < delay:
        time.sleep(0.005)
    after = None
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        after = time.monotonic() - start
    process.wait()
    return Kill("random", after, *_checkpoint_dirs(output_dir))


def kill_in_write(model: str, output_dir: str, rng: random.Random) -> Kill:
    """Runs train.py and SIGKILLs it inside a random checkpoint's write (before its commit)."""
    kill_at = rng.randint(1, NUM_CHECKPOINTS)
    command = [sys.executable, "-c", IN_WRITE, *flags(model, output_dir, mode="D")]
    start = time.monotonic()
    done = subprocess.run(
        command, cwd=REPO, env=dict(env(), KILL_AT=str(kill_at)), capture_output=True, timeout=600
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return Kill("in_write", time.monotonic() - start, *_checkpoint_dirs(output_dir))


def kill_one_process(
    model: str, output_dir: str, rng: random.Random, span_s: float, logs: str
) -> Kill:
    """``launch.py`` 2 x 2; SIGKILLs one of the two processes at a random moment of training."""
    command = [
        sys.executable,
        "launch.py",
        f"--logs={logs}",
        "--",
        *flags(model, output_dir, mode="D"),
    ]
    start = time.monotonic()
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    pids = [int(re.search(r"pid (\d+)", launcher.stderr.readline()).group(1)) for _ in range(2)]
    victim = rng.randrange(2)
    wait_for_training(output_dir, launcher)
    time.sleep(rng.uniform(0, span_s))
    after = None
    if launcher.poll() is None:
        try:
            os.kill(pids[victim], signal.SIGKILL)
            after = time.monotonic() - start
        except ProcessLookupError:
            pass
    launcher.communicate(timeout=120)  # the launcher stops the other process and exits
    if after is not None:
        assert launcher.returncode != 0
    return Kill("one_process", after, *_checkpoint_dirs(output_dir), victim=victim)


def resume_launched(model: str, output_dir: str, logs: str) -> None:
    """Resumes a 2 x 2 run to its end with ``launch.py``."""
    command = [
        sys.executable,
        "launch.py",
        f"--logs={logs}",
        "--",
        *flags(model, output_dir, mode="D", resume=True),
    ]
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def signal_then_resume(
    args: list[str], output_dir: str, logged: str, signum: int, environ: dict
) -> tuple[int, str]:
    """Starts train.py with ``args`` (:data:`SLOW_TRAIN`), sends ``signum`` once ``logged`` (a
    ``metrics.jsonl``) holds a line, checks the exit status (128 + ``signum``), that the last
    line names a checkpointed step and the command that resumes, and runs that command to the
    end; returns the step and what the resumed run printed."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *args],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.exists(logged) and os.path.getsize(logged):
            break  # a step is logged: training is under way
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = int(re.fullmatch(r"interrupted at step (\d+); resume with: .*", last).group(1))
    assert 1 <= step < NUM_CHECKPOINTS
    assert str(step) in os.listdir(os.path.join(output_dir, "checkpoints"))
    command = last.split("resume with: ", 1)[1]
    assert command == shlex.join([sys.executable, "train.py", *args, "--config.resume=True"])
    resumed = subprocess.run(
        shlex.split(command), cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return step, resumed.stdout


def outcome(output_dir: str) -> dict:
    """What a finished run leaves that must not depend on a kill: params, history, log lines."""
    from safetensors.numpy import load_file

    params = load_file(os.path.join(output_dir, "model", "model.safetensors"))
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        log = f.read()
    return {"params": params, "history": results["history"], "metrics.jsonl": log}


def same_outcome(a: dict, b: dict) -> bool:
    """Bit for bit: every param array, the eval history, the metrics log."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    same_params = len(leaves_a) == len(leaves_b) and all(
        np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)
    )
    return same_params and a["history"] == b["history"] and a["metrics.jsonl"] == b["metrics.jsonl"]
