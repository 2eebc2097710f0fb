"""The package's import graph: every module states what it uses at the top, the graph has no
cycle, and each module imports on its own (in any order), not only through ``msf_monai``'s
``__init__`` importing everything in a fixed order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_utils import REPO

PACKAGE = REPO / "msf_monai"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package_imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import of a ``msf_monai`` module."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "msf_monai")
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child)
                if target.split(".")[0] == "msf_monai":
                    found.append((target, in_function))
                    # "from . import handlers": the names may be modules themselves
                    found.extend((f"{target}.{a.name}", in_function) for a in child.names if f"{target}.{a.name}" in MODULES)
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules its top-level imports run (an imported module's packages too,
    whose ``__init__`` runs first, unless the importer is inside them; the root package, which
    imports everything, left out)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = set()
        for target, in_function in _package_imports(name, path):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if not name.startswith(prefix + "."):  # a package's own __init__ is already running
                    edges.add(prefix)
        graph[name] = {e for e in edges if e in MODULES and e != name}
    return graph


def test_no_module_imports_the_package_inside_a_function():
    lazy = [f"{name} -> {target}" for name, path in MODULES.items()
            for target, in_function in _package_imports(name, path) if in_function]
    assert not lazy, "import these at the top of the module (a lazy import hides a dependency or a cycle): " + ", ".join(lazy)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert graph["msf_monai.resume"] >= {"msf_monai.saved_state", "msf_monai.training_record"}  # the graph is read
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in graph:
        if name not in state and name != "msf_monai":
            visit(name)


def test_a_cycle_is_found(monkeypatch):
    """The cycle check can fail: two modules that import each other are reported."""
    fake = {"msf_monai.a": {"msf_monai.b"}, "msf_monai.b": {"msf_monai.a"}}
    monkeypatch.setitem(globals(), "_graph", lambda: {**fake, "msf_monai.resume": {"msf_monai.saved_state", "msf_monai.training_record"},
                                                      "msf_monai.saved_state": set(), "msf_monai.training_record": set()})
    with pytest.raises(pytest.fail.Exception, match="import cycle: msf_monai.a -> msf_monai.b -> msf_monai.a"):
        test_the_import_graph_has_no_cycle()


# the modules in a fresh interpreter, with the root package's __init__ (which imports every
# module in its own fixed order) replaced by an empty package: with no cycle and no lazy import
# (above), any order works; two opposite orders check that the static reading is right
_ALONE = """
import importlib, sys, types
root = types.ModuleType("msf_monai")
root.__path__ = [sys.argv[1]]
sys.modules["msf_monai"] = root
for name in sys.argv[2:]:
    importlib.import_module(name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_the_modules_import_on_their_own_in_any_order(order):
    names = sorted(m for m in MODULES if m != "msf_monai")
    names = names if order == "sorted" else names[::-1]
    result = subprocess.run([sys.executable, "-c", _ALONE, str(PACKAGE), *names], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
