"""What every command does with bad input: one ``error: ...`` line on stderr and an exit status,
no traceback."""

import sys
from typing import NoReturn

USAGE_ERROR = 2  # bad command line (a flag, a setting, a file named on it)


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Prints ``error: message`` to stderr and exits with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
