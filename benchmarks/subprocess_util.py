"""Running a benchmark in a fresh Python process and reading back its one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_MARKER = "BENCHMARK-RESULT "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(result: Any) -> None:
    """Prints ``result`` as the child's answer (the parent reads the last such line)."""
    print(_MARKER + json.dumps(result), flush=True)


def run_module(
    module: str, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Runs ``python -m module *args`` from the repository root; returns its emitted JSON.

    Raises ``RuntimeError`` with the child's output tail if it fails or emits nothing.
    """
    child_env = dict(os.environ)
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=_ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(
            f"`python -m {module} {' '.join(args)}` failed ({proc.returncode}):\n{tail}"
        )
    return json.loads(lines[-1][len(_MARKER) :])
