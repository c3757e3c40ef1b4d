"""``--config`` of ``childtuning-train``: a packaged configuration's name (``rte``) or a file,
resolved, loaded and its ``--config.KEY`` overrides checked before absl parses the command line;
and the settings with their defaults and meanings (the comments of ``configs/glue.py``) for
``--help``."""

from __future__ import annotations

import difflib
import importlib.util
import io
import os
import re
import textwrap
import tokenize

import ml_collections

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT = "glue"  # the base configuration every packaged one extends
_ASSIGNMENT = re.compile(r"^\s*config\.(\w+)\s*=")


def packaged_names() -> list[str]:
    """The packaged configurations, by name: ``cola``, ``glue``, ``quickstart``, ``rte``, ..."""
    files = os.listdir(PACKAGED_DIR)
    return sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))


def config_path(value: str) -> str:
    """The file ``--config=value`` names: a packaged configuration (``rte``) or a path. A missing
    ``configs/NAME.py`` (the repository's former layout, in recorded commands) is the packaged one.

    Raises:
      ValueError: neither a file nor a packaged name.
    """
    names = packaged_names()
    if value in names:
        return os.path.join(PACKAGED_DIR, f"{value}.py")
    if os.path.isfile(value):
        return value
    head, file = os.path.split(value)
    if os.path.basename(head) == "configs" and file.endswith(".py") and file[:-3] in names:
        return os.path.join(PACKAGED_DIR, file)
    raise ValueError(
        f"--config={value}: no such file, nor a packaged configuration ({', '.join(names)})."
    )


def _is_flag(arg: str, name: str) -> bool:
    return arg in (f"--{name}", f"-{name}")


def resolve_argv(argv: list[str]) -> tuple[list[str], str]:
    """``argv`` with ``--config``'s value replaced by its file (:func:`config_path`), and that
    file (the default configuration's when ``--config`` is absent)."""
    out, path = list(argv), config_path(DEFAULT)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, sep, value = arg.partition("=")
        if sep and _is_flag(name, "config"):
            path = config_path(value)
            out[i] = f"{name}={path}"
        elif _is_flag(arg, "config") and i + 1 < len(argv):
            path = config_path(argv[i + 1])
            out[i + 1] = path
    return out, path


def load(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the configuration file ``path``."""
    spec = importlib.util.spec_from_file_location("childtuning_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override_keys(argv: list[str]) -> list[str]:
    """The keys of ``--config.KEY=VALUE`` (and ``--[no]config.KEY``) arguments."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        name = arg.lstrip("-").partition("=")[0]
        if arg.startswith("-") and name.startswith(("config.", "noconfig.")):
            keys.append(name.partition(".")[2])
    return keys


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of ``config``, nested ones as ``a.b``."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{key}.")
    return keys


def check_keys(keys: list[str], config: ml_collections.ConfigDict, flag: str) -> None:
    """Raises ``ValueError`` naming the first of ``keys`` that is no setting of ``config`` (as
    ``flag`` writes it, e.g. ``--config.{}``), and the setting it most likely meant."""
    known = flat_keys(config)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {flag.format(close[0])}?" if close else ""
            raise ValueError(
                f"{flag.format(key)}: no such setting{hint} (childtuning-train --help lists them)"
            )


def check_overrides(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """:func:`check_keys` of the ``--config.KEY`` arguments in ``argv``."""
    check_keys(override_keys(argv), config, "--config.{}")


def comment_meanings(path: str) -> dict[str, str]:
    """Each ``config.KEY = ...`` line's meaning in the file ``path``: its own trailing comment,
    else the comment lines directly above it (a section title such as ``# Data.`` left out)."""
    with open(path) as f:
        source = f.read()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    meanings = {}
    for number, line in enumerate(lines, start=1):
        match = _ASSIGNMENT.match(line)
        if not match or meanings.get(match.group(1)):  # the first commented assignment
            continue
        if number in comments:
            meanings[match.group(1)] = comments[number]
            continue
        above, i = [], number - 1
        while i >= 1 and lines[i - 1].lstrip().startswith("#"):
            above.insert(0, comments[i])
            i -= 1
        titles = [t for t in above if t.endswith(".") and len(t.split()) <= 4]
        meanings[match.group(1)] = " ".join(t for t in above if t not in titles)
    return meanings


def default_text(value) -> str:
    """A default as ``--config.KEY=`` text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def settings_help(path: str, width: int = 100) -> str:
    """Every setting of the configuration file ``path``: ``--config.KEY=DEFAULT`` and its
    meaning (:func:`comment_meanings` of that file, else of the base configuration)."""
    config = load(path)
    meanings = comment_meanings(config_path(DEFAULT))
    if os.path.abspath(path) != os.path.abspath(config_path(DEFAULT)):
        meanings.update({k: v for k, v in comment_meanings(path).items() if v})
    out = []
    keys = flat_keys(config)
    for key in [k for k in meanings if k in keys] + [k for k in keys if k not in meanings]:
        value = config
        for part in key.split("."):
            value = value[part]
        out.append(f"  --config.{key}={default_text(value)}")
        meaning = meanings.get(key, "")
        if meaning:
            out += textwrap.wrap(meaning, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)
