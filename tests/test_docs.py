"""The README and the pages in docs/ say what runs.

Every ```python block of README.md and docs/*.md runs: the blocks of one page in order, in one
namespace (a page may set up a tiny model in its first block), from an empty temporary folder.
A block whose first line is the skip marker (a comment naming why: a long run, the network) is
left out. Relative links point at files that exist, and the README stays a newcomer's page.
"""

import importlib
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARKER = "# not run by tests/test_docs.py:"
OPTIONAL = {"torch"}  # a block that imports one of these is skipped where it is not installed
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """``(line number of the first code line, code)`` of each fenced block in ``language``."""
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1) == language
    ]


def test_code_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert code_blocks(text, "python") == [(3, "x = 1\n"), (9, "y = 2\n")]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in code_blocks(page.read_text(), "python"):
        if code.startswith(SKIP_MARKER):
            continue
        # Blank lines in front, so a traceback names the page's own line numbers.
        try:
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name not in OPTIONAL:
                raise
            pytest.skip(f"{page.name}:{line} needs {error.name}")


def test_skipped_blocks_say_why():
    for page in PAGES:
        for line, code in code_blocks(page.read_text(), "python"):
            first = code.splitlines()[0] if code.strip() else ""
            if first.startswith(SKIP_MARKER):
                assert first[len(SKIP_MARKER) :].strip(), f"{page.name}:{line}: no reason given"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_exist(page):
    text = FENCE.sub("", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target}, which does not exist"


def documented_settings() -> set[str]:
    """The keys named in the first column of docs/trainer.md's settings table."""
    text = (REPO / "docs" / "trainer.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {key for cell in rows for key in re.findall(r"`(\w+)`", cell)}


def test_every_setting_is_documented():
    try:  # the packaged configurations, or the checkout's configs/ before they were packaged
        glue = importlib.import_module("childtuning_trainer.configs.glue")
    except ModuleNotFoundError:
        glue = importlib.import_module("configs.glue")
    missing = sorted(set(glue.get_config().keys()) - documented_settings())
    assert not missing, f"docs/trainer.md's settings table lacks {missing}"


def test_readme_is_a_short_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
