"""What every command does with bad input (one ``error: ...`` line on stderr and an exit status, no
traceback) and with ``--help`` (what it does and its flags, exit status 0)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

USAGE_ERROR = 2  # bad command line (a flag, a setting, a file named on it)
HELP_ARGS = ("-h", "--help", "-help", "-?", "--helpshort", "-helpshort")


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Prints ``error: message`` to stderr and exits with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def help_asked(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (before any ``--``) asks for ``--help``."""
    args = list(argv[1:])
    return any(arg in HELP_ARGS for arg in args[: args.index("--") if "--" in args else None])


def indented(text: str, width: int = 96) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)


def flags_help(names: Sequence[str]) -> str:
    """``--NAME=DEFAULT`` and the help of each of the flags ``names``."""
    lines = []
    for name in names:
        flag = flags.FLAGS[name]
        default = flag.default_as_str if flag.default is not None else ""
        lines += [f"  --{name}={default.strip(chr(39))}", *indented(flag.help)]
    return "\n".join(lines)


def print_help(usage: str, doc: str, names: Sequence[str] = ()) -> NoReturn:
    """``--help``: the usage line, the command's docstring and its flags; exits with 0."""
    text = [usage, doc.split("\n\n", 1)[-1].rstrip()]
    if names:
        text += ["", "flags:", flags_help(names)]
    print("\n".join([*text, "", "  --helpfull", *indented("every flag, absl's included")]))
    sys.exit(0)
