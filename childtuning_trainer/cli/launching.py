"""``childtuning-launch``: starts a multi-process run on this machine: N processes with M CPU
devices each.

  childtuning-launch --num_processes=2 -- --config=rte --config.output_dir=runs/rte_D_2x2

Each process runs ``childtuning-train`` (or ``--script``) with the arguments after ``--`` and
``--config.coordinator_address``, ``--config.num_processes`` and ``--config.process_id`` added;
JAX's multi-controller runtime (``jax.distributed``) joins them, and they reduce over gloo CPU
collectives. Process 0 prints to this terminal; process i > 0 writes ``--logs/process_i.log``.
If one process fails or is killed, the others are stopped and this exits with its status.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from childtuning_trainer.cli.usage import help_asked, print_help

TRAIN_MODULE = "childtuning_trainer.cli.training"  # what childtuning-train runs

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start (N).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 2, "CPU devices of each process (M).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on localhost (0: a free one).")
_SCRIPT = flags.DEFINE_string(
    "script", TRAIN_MODULE, "The program each process runs: a module (python -m) or a .py file."
)
_LOG_DIR = flags.DEFINE_string("logs", "", "Where processes 1..N-1 log (empty: a new tmp dir).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
    """This environment with JAX on CPU and ``devices`` host devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    return env


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to those still running, then SIGKILL after 5 s."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in processes:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> None:
    n, m = _NUM_PROCESSES.value, _DEVICES.value
    if n < 1 or m < 1:
        raise app.UsageError(f"--num_processes={n} and --devices_per_process={m} must be >= 1")
    args = argv[1:]
    address = f"localhost:{_PORT.value or free_port()}"
    log_dir = _LOG_DIR.value or tempfile.mkdtemp(prefix="launch_")
    os.makedirs(log_dir, exist_ok=True)
    processes, logs = [], []
    # The command that resumes the run, as the processes print it (trainer: interruption.py).
    command_env = {"CHILDTUNING_COMMAND": shlex.join([sys.executable, *sys.argv])}
    for i in range(n):
        script = _SCRIPT.value
        program = [script] if script.endswith(".py") else ["-m", script]
        command = [sys.executable, *program, *args]
        command += [
            f"--config.coordinator_address={address}",
            f"--config.num_processes={n}",
            f"--config.process_id={i}",
        ]
        out = None
        if i > 0:
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        processes.append(
            subprocess.Popen(  # own session: a terminal's Ctrl-C reaches them once, from here
                command,
                env={**process_env(m), **command_env},
                stdout=out,
                stderr=out and subprocess.STDOUT,
                start_new_session=True,
            )
        )
        print(f"launch: process {i} pid {processes[-1].pid}", file=sys.stderr, flush=True)
    print(f"launch: {n} x {m} devices, coordinator {address}, logs in {log_dir}", file=sys.stderr)

    def forward(signum, frame):  # each process checkpoints and stops; then as stop() does
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop(processes)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(p.poll() is None for p in processes):
        failed = [(i, p.returncode) for i, p in enumerate(processes) if p.returncode]
        if failed:
            i, code = failed[0]
            print(f"launch: process {i} exited with {code}; stopping the others", file=sys.stderr)
            stop(processes)
            status = code
            break
        time.sleep(0.2)
    for log in logs:
        log.close()
    status = status or next((p.returncode for p in processes if p.returncode), 0)
    sys.exit(status if status > 0 else (128 - status if status < 0 else 0))


def run(argv: list[str] | None = None) -> None:
    """The ``childtuning-launch`` entry."""
    if help_asked(sys.argv if argv is None else argv):
        usage = "usage: childtuning-launch [flags] -- [childtuning-train's arguments]"
        print_help(
            usage, __doc__, ("num_processes", "devices_per_process", "port", "script", "logs")
        )
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
