"""The shape of the repository: the import graph (library <- trainer <- benchmarks, nothing
pointing back, no cycle), modules of one idea under 350 lines with distinct names, the config read
only at the trainer's entry, and results kept as data."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"childtuning_jax": 0, "childtuning_trainer": 1, "benchmarks": 2}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: pathlib.Path, name: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # type-only imports (under `if TYPE_CHECKING:`) do not run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) - {name} for name, path in modules.items()}


def test_imports_point_from_benchmarks_to_trainer_to_library_only():
    for name, targets in _graph().items():
        for target in targets:
            here, there = LAYERS[name.split(".")[0]], LAYERS[target.split(".")[0]]
            assert there <= here, f"{name} imports {target}"


def test_the_import_graph_has_no_cycle():
    """Ignoring a package's own ``__init__`` (which re-exports what its modules define)."""
    graph = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in _graph().items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(node) :] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in sorted(graph[node]):
            visit(target, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


MAX_MODULE_LINES = 350
# Files that may share a name: package markers, and one module per family of the same role.
SHARED_NAMES = {"__init__.py", "data.py", "tasks.py"}
# The trainer modules that read an ml_collections config: the entry, the settings readers, the
# commands and configurations (childtuning_trainer.cli, .configs) and the experiment tooling (which
# writes configs for childtuning-train). Every other module takes settings.
READS_CONFIG = {
    "childtuning_trainer.loop",
    "childtuning_trainer.settings",
    "childtuning_trainer.regularization",
}


def _python_files() -> list[pathlib.Path]:
    roots = [REPO / p for p in (*LAYERS, "tools")]
    files = [path for root in roots for path in root.rglob("*.py")]
    return files + sorted(REPO.glob("*.py"))


def test_modules_stay_under_the_size_of_one_idea():
    for path in _modules().values():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines"


def test_modules_of_different_roles_have_different_names():
    seen: dict[str, pathlib.Path] = {}
    for path in _python_files():
        if path.name in SHARED_NAMES:
            continue
        other = seen.setdefault(path.name, path)
        assert other == path, f"{other.relative_to(REPO)} and {path.relative_to(REPO)}"


def test_the_config_is_read_at_the_entry_only():
    for name, path in _modules().items():
        if not name.startswith("childtuning_trainer") or name.startswith(
            tuple(f"childtuning_trainer.{p}" for p in ("experiments", "cli", "configs"))
        ):
            continue
        if "ml_collections" in path.read_text():
            assert name in READS_CONFIG, f"{name} reads the config; give it settings instead"


def test_no_package_module_names_the_checkouts_data_folder():
    """The data are found through ``config.data_dir`` or ``$CHILDTUNING_DATA_DIR``
    (``childtuning_trainer.data_location``), wherever the package is installed."""
    for name, path in _modules().items():
        if name.startswith(("childtuning_jax", "childtuning_trainer")):
            text = path.read_text()
            assert "../shared" not in text and '"..", "shared"' not in text, name


def test_tests_hold_tests_and_their_fixtures_only():
    helpers = {"conftest.py", "tiny_models.py"}
    for path in (REPO / "tests").glob("*.py"):
        assert path.name.startswith("test_") or path.name in helpers, f"{path.name} is no test"


def test_results_are_records_not_files_per_run():
    """``experiments/`` holds the append-only records and one folder per protocol report."""
    experiments = REPO / "experiments"
    for path in experiments.iterdir():
        if path.is_dir():
            assert (path / "protocol.json").exists(), f"{path.name}/ is not a protocol report"
            assert not [c for c in path.iterdir() if c.is_dir()], f"{path.name}/ holds folders"
        else:
            assert path.suffix == ".jsonl", f"experiments/{path.name} is not a record file"
