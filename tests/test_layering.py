"""The import rules of the architecture (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedfm"

# A module may import fedfm modules of its own layer or of lower layers only.
LAYERS: dict[str, int] = {
    "errors": 0, "keys": 0, "config": 0, "interrupt": 0,
    "tasks": 1, "data": 1, "gguf": 1, "dinov2": 1, "attacks": 1, "compression": 1,
    "adapters": 2, "train": 2, "wire": 2, "privacy": 2,
    "strategies": 3, "rundir": 3, "legacy": 3, "report": 3, "report_compare": 3, "progress": 3, "instruction": 3, "tracking": 3,
    "workspace": 4, "hospital_state": 4, "export": 4, "predict": 4, "preflight": 4, "benchmark": 4,
    "client": 5, "server": 5, "secagg": 5,
    "engine": 6, "runner": 6, "hospital_process": 6, "cli": 7,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _runtime_nodes(path: Path) -> list[ast.AST]:
    """The nodes of ``path`` outside `if TYPE_CHECKING:` blocks (imports inside functions included)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return [node for node in ast.walk(tree) if id(node) not in skip]


def _runtime_imports(path: Path) -> set[str]:
    """fedfm modules imported outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    for node in _runtime_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedfm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "fedfm":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fedfm."))
    return found


SOURCES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_down_the_layers(path: Path) -> None:
    unit = _unit(path)
    assert unit in LAYERS, f"{unit} has no layer: add it to LAYERS and docs/architecture.md"
    for imported in _runtime_imports(path):
        if imported not in LAYERS:
            continue  # names imported from the package root, e.g. __version__
        assert LAYERS[imported] <= LAYERS[unit], f"{unit} (layer {LAYERS[unit]}) imports {imported} (layer {LAYERS[imported]})"


def test_only_privacy_imports_opacus() -> None:
    offenders = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
        if "opacus" in p.read_text() and "import opacus" in p.read_text().replace("from opacus", "import opacus")
        and p.relative_to(SRC).parts[0] != "privacy"
    ]
    assert offenders == []


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_strategies_never_load_torch() -> None:
    loaded = _modules_after_import("fedfm.strategies")
    assert "torch" not in loaded


def test_training_loop_never_loads_flower() -> None:
    loaded = _modules_after_import("fedfm.train")
    assert not any(m == "flwr" or m.startswith("flwr.") for m in loaded)


PACKAGES = sorted(p.parent for p in SRC.rglob("__init__.py") if p.parent != SRC)


def _sibling_imports(path: Path) -> set[str]:
    """Modules of ``path``'s own package that it imports at runtime (``__init__`` for the package's names)."""
    package = path.parent
    dotted = "fedfm." + ".".join(package.relative_to(SRC).parts)
    siblings = {p.stem for p in package.glob("*.py")}
    found: set[str] = set()
    for node in _runtime_nodes(path):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: `from .registry import x`, `from . import secure`
                module = ".".join(dotted.split(".")[: len(dotted.split(".")) - node.level + 1] + ([module] if module else []))
            if module == dotted:
                found.update(a.name if a.name in siblings else "__init__" for a in node.names)
            elif module.startswith(dotted + "."):
                found.add(module.removeprefix(dotted + ".").split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(dotted + "."):
                    found.add(alias.name.removeprefix(dotted + ".").split(".")[0])
    found.discard(path.stem)
    return found & siblings


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of ``graph`` found by a depth-first search, each as a path back to its start."""
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            circles.append([*path[path.index(node):], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return circles


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_circles_inside_a_package(package: Path) -> None:
    # A module imported lazily inside a function counts too: a circle there is one the reader must untangle.
    graph = {p.stem: _sibling_imports(p) for p in sorted(package.glob("*.py"))}
    circles = _circles(graph)
    assert circles == [], " ; ".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_circles() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"__init__": {"a", "b"}, "a": {"b"}, "b": set()}) == []
