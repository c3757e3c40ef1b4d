"""What a run writes besides checkpoints: ``metrics.jsonl`` lines and JSON files."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl``; on resume drops lines past ``step``."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        lines = []
        if resume_step and os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(lines)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
