"""The import graph: library <- trainer <- benchmarks, nothing pointing back, no cycle."""

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
