"""The layers: rules/ imports only what is below it, and no package imports in circles.

docs/architecture.md draws the layers: drivers/ at the bottom, rules/ (the pure
library the daemon runs) on it, models/ (data set and training) and sim/
(the simulator and the evaluation) above rules/. Every import counts here —
at module level, inside a function, or only for the type checker — because
each one is a dependency a reader must follow and a cycle a refactor must
untangle. A circle fails the test, named module by module.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Every package of the repository (an import of one of these is "ours").
OURS = ("gateway", "drivers", "rules", "models", "sim", "thingsboard", "bench")
#: The packages whose import graph must have no circle.
CHECKED = ("gateway", "drivers", "rules", "models", "sim")
#: What rules/ may import besides the standard library.
RULES_MAY_IMPORT = frozenset({"rules", "drivers", "numpy"})


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a`` and ``a.b``)."""
    package = _module(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the modules of the repository it imports (among every module of ``OURS``)."""
    files = {_module(f): f for pkg in OURS for f in (ROOT / pkg).rglob("*.py")}
    return {
        name: {dep for dep in _imports(path) if dep in files and dep != name}
        for name, path in files.items()
        if name.split(".")[0] in packages
    }


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_circles_and_every_kind_of_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # Relative imports resolve to the package's modules (drivers/link.py uses them).
    assert {"drivers.errors", "drivers.nodelink"} <= set(_imports(ROOT / "drivers" / "link.py"))
    # A TYPE_CHECKING import counts like any other (rules/calibration.py types numpy so).
    assert "numpy" in set(_imports(ROOT / "rules" / "calibration.py"))


@pytest.mark.parametrize("package", CHECKED)
def test_no_import_circle(package: str) -> None:
    graph = _graph(OURS)
    assert any(m.split(".")[0] == package for m in graph), f"no module found in {package}/"
    through = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert through == []


def test_rules_imports_only_rules_drivers_stdlib_and_numpy() -> None:
    wrong = {}
    for path in sorted((ROOT / "rules").rglob("*.py")):
        bad = {
            name
            for name in _imports(path)
            if name.split(".")[0] not in RULES_MAY_IMPORT | {"__future__"}
            and name.split(".")[0] not in sys.stdlib_module_names
        }
        if bad:
            wrong[_module(path)] = sorted(bad)
    assert wrong == {}
