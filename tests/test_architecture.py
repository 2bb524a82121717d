"""The import graph of the runtime packages has no circles.

Every module of gateway/, drivers/, rules/, models/ and sim/ is parsed with
`ast` (never imported); its imports are every ``import``/``from ... import``
in the file: at module level, under ``if TYPE_CHECKING:`` (a circle that only
the type checker sees is still two modules that cannot be understood one
without the other) and inside functions (a deferred import hides a circle, it
does not remove it). A circle fails the test, named module by module.

Which packages must be free of circles is :data:`CHECKED`: gateway/ and
drivers/ today; rules/ and sim/ join it as their circles are taken apart
(add them to CHECKED then, and any layering rule next to
``test_no_import_circle``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The packages whose modules are parsed.
PACKAGES = ("gateway", "drivers", "rules", "models", "sim")
#: The packages in which no import circle is allowed (circles through another package count).
CHECKED = ("gateway", "drivers")


def module_name(path: Path) -> str:
    """``gateway/control.py`` -> ``gateway.control``; a package's ``__init__`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str) -> set[str]:
    """Every module name ``path`` imports, wherever in the file (see the module docstring)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # submodules
    return found


def import_graph(packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (itself excluded)."""
    files = {module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in imports_of(path, package) if m in files and m != name}
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # the graph is a few hundred modules: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return sorted(found)


def test_the_graph_is_read() -> None:
    graph = import_graph()
    # The command path, one way: node -> control -> procedures -> ports.
    assert "gateway.control" in graph["gateway.node"]
    assert "gateway.ports" in graph["gateway.titration"]
    assert "gateway.node" not in graph["gateway.control"]
    assert "drivers.link" in graph["gateway.node"]


def test_a_circle_is_found_and_named() -> None:
    graph: dict[str, set[str]] = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_type_checking_and_function_imports_count(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gateway.node import NodeRunner\n"
        "def f() -> None:\n    import gateway.daemon\n"
    )
    found = imports_of(module, "x")
    assert {"gateway.node", "gateway.daemon"} <= found


@pytest.mark.parametrize("package", CHECKED)
def test_no_import_circle(package: str) -> None:
    graph = import_graph()
    bad = [c for c in circles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not bad, f"import circles in {package}/: " + "; ".join(" <-> ".join(c) for c in bad)
