"""SIGINT and SIGTERM stop a run cleanly: the current step finishes, a checkpoint is written, and
``train.py`` prints how to resume and exits with ``128 + signal`` (130, 143).

Ctrl-C, a Slurm time limit and a preempted TPU VM all end a job this way. :class:`StopRequest`
catches the signals while the run goes on; the training loop asks :meth:`StopRequest.requested`
after every step and, when it says so, checkpoints and stops. A second signal stops at once (the
run resumes from its last checkpoint).

Several processes must stop at the same step (a checkpoint is collective), so in a multi-process
run they agree: every ``every`` steps (the log interval) and at every epoch's end, the processes
gather their flags, and all stop if one was signalled. A single process stops after the step it
is in.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# launch.py sets it to its own command line: the command that resumes every process.
COMMAND_ENV = "CHILDTUNING_COMMAND"


class Interrupted(Exception):
    """The run stopped on ``signum``; ``step``: its checkpoint's step (``None``: a second signal
    stopped it at once, the run resumes from its last checkpoint)."""

    def __init__(self, signum: int, step: int | None):
        self.signum, self.step = signum, step
        where = f"at step {step}" if step is not None else "before the next checkpoint"
        super().__init__(f"interrupted {where}; resume with: {resume_command()}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run: ``argv`` (default: this process's, or launch.py's
    command) without ``resume`` / ``overwrite`` flags, plus ``--config.resume=True``."""
    if argv is None:
        launched = os.environ.get(COMMAND_ENV)
        argv = shlex.split(launched) if launched else list(sys.argv)
        if argv and argv[0].endswith(".py") and not launched:
            argv = [sys.executable, *argv]
    dropped = ("--config.resume", "--config.overwrite")
    kept = [a for a in argv if a.split("=", 1)[0] not in dropped]
    return shlex.join([*kept, "--config.resume=True"])


class StopRequest:
    """Catches SIGINT and SIGTERM while it is entered (in the main thread; elsewhere it only
    records nothing); see the module docstring."""

    def __init__(self, every: int = 1):
        self.every = every
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        self.take_signals()
        return self

    def take_signals(self) -> None:
        """Installs the handlers (again: ``jax.distributed.initialize`` installs its own SIGTERM
        handler, so a multi-process run takes the signals back once the processes have joined)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(signum, None)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"{name}: stopping after this step, with a checkpoint ({name} again: stop now)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, step: int, *, agree: bool = False) -> bool:
        """Whether to stop after ``step``; with several processes, an answer they all share, asked
        (collectively) when ``agree`` or ``step`` is a multiple of ``every``, else False."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not agree and step % self.every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        signalled = int(np.max(flags))
        if signalled and self.signum is None:
            self.signum = signalled
        return bool(signalled)

    def raise_if_stopped(self, step: int) -> None:
        """Raises :class:`Interrupted` if a signal stopped the run at ``step``."""
        if self.signum is not None:
            raise Interrupted(self.signum, step)
