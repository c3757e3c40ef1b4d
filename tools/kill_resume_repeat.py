"""Repeats the kill-anywhere resume trial (``test_kill_resume.py``) and counts the bit-exact ones.

  python tools/kill_resume_repeat.py --trials=20                # one process x 4 devices
  python tools/kill_resume_repeat.py --trials=5 --processes=2   # launch.py 2 x 2, one killed

Each trial SIGKILLs a ``train.py`` run of ChildTuning-D on 24 RTE examples (6 steps, a
checkpoint at each) at a random moment, resumes it to the end with ``resume=true``, and compares
params, eval history and ``metrics.jsonl`` with an uninterrupted run. Prints one JSON line per
trial and a summary; exits 1 unless every trial matched.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kill_trials import (  # noqa: E402
    REPO,
    env,
    flags,
    kill_at_random,
    kill_one_process,
    outcome,
    resume_launched,
    same_outcome,
    wait_for_training,
)


def tiny_model(directory: str) -> str:
    """The tests' one-layer BERT (``tests/tiny_models.save_tiny_bert``), made in a child process."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import conftest; "
        "from tiny_models import save_tiny_bert; "
        f"save_tiny_bert({directory!r}, 2, headless=True)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True)
    return directory


def train(model: str, output_dir: str, **overrides) -> float:
    start = time.monotonic()
    command = [sys.executable, "train.py", *flags(model, output_dir, mode="D", **overrides)]
    subprocess.run(command, cwd=REPO, env=env(), check=True, capture_output=True)
    return time.monotonic() - start


def time_phases(model: str, output_dir: str) -> tuple[float, float]:
    """One uninterrupted run: seconds to its first checkpoint write, and from there to its end."""
    command = [sys.executable, "train.py", *flags(model, output_dir, mode="D")]
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_training(output_dir, process)
    training = time.monotonic()
    process.wait()
    return training - start, max(time.monotonic() - training, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="kill_resume_")
    model = tiny_model(os.path.join(work, "tiny_bert"))
    rng = random.Random(args.seed)
    reference_dir = os.path.join(work, "reference")
    if args.processes == 1:
        train(model, reference_dir)
    else:
        resume_launched(model, reference_dir, os.path.join(work, "logs_ref"))
    startup, span = None, None
    if args.processes == 1:
        # A second, warm run times its start-up (to the first checkpoint write) and the rest, so
        # the random kills land inside the run rather than after it.
        startup, span = time_phases(model, os.path.join(work, "calibration"))
    else:
        with open(os.path.join(reference_dir, "results.json")) as f:
            results = json.load(f)
        span = max(results["train_time_s"] + results["eval_time_s"], 1.0)
    expected = outcome(reference_dir)
    matched = 0
    for trial in range(args.trials):
        out = os.path.join(work, f"trial_{trial}")
        logs = os.path.join(work, f"logs_{trial}")
        if args.processes == 1:
            command = [sys.executable, "train.py", *flags(model, out, mode="D")]
            kill = kill_at_random(command, out, rng, span, env(), startup_s=startup)
            train(model, out, resume=True)
        else:
            kill = kill_one_process(model, out, rng, span, logs)
            resume_launched(model, out, logs)
        ok = same_outcome(outcome(out), expected)
        matched += ok
        print(json.dumps({"trial": trial, "bit_exact": ok, **kill.__dict__}), flush=True)
    summary = {"trials": args.trials, "bit_exact": matched, "processes": args.processes}
    print(json.dumps(summary))
    sys.exit(0 if matched == args.trials else 1)


if __name__ == "__main__":
    main()
