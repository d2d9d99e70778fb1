"""The house, checked from the code's own imports (docs/architecture.md): no circle, nothing imported upward.

Every ``import`` and ``from … import`` of every module is read with ``ast`` — those inside function bodies too, since
a late import is still a dependency — and resolved to the module it names. Three rules:

1. no two modules import each other, directly or round a longer loop;
2. no two packages do (a package here is a layer unit: ``core.store``, ``core.config``, ``train_student`` …);
3. a unit imports only from its own unit or from a unit of a lower layer. The layers are written once, below.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("core", "cache_teachers", "train_student", "teachcache")

# Lowest first. Units of one layer may not import each other (the two stages never do).
LAYERS: list[tuple[str, ...]] = [
    (
        "core",
        "core.errors",
        "core.progress",
        "core.source_code",
        "core.user_cache",
    ),  # `core` itself: its __init__ (the version)
    ("core.terms", "core.paths"),
    ("core.config",),
    ("core.models",),
    ("core.store",),
    ("core.data",),
    ("core.inference",),
    ("core.losses",),
    ("core.teachers",),
    ("core.experiment",),
    ("core.evaluation",),
    ("core.inspection",),
    ("core.training",),
    ("core.deploy",),
    ("cache_teachers", "train_student"),
    ("teachcache",),
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``packages`` (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports anywhere in its body (itself excluded)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                # `from pkg import module` names a module; `from module import name` names its module
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
        graph.setdefault(name, set())
    return dict(graph)


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: ``core.<package>`` or ``core.<module>`` in core, else its top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "core" and len(parts) > 1 else parts[0]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan), each sorted: every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        units[unit_of(module)].update(unit_of(m) for m in imported if unit_of(m) != unit_of(module))
    return dict(units)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``"a imports b"`` for every import of a unit from its own layer's other units or from a higher layer."""
    bad = []
    for module, imported in sorted(graph.items()):
        here = unit_of(module)
        for target in sorted(imported):
            there = unit_of(target)
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                bad.append(f"{module} ({here}) imports {target} ({there})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, TOP_PACKAGES)


def test_every_unit_has_a_layer(graph):
    unplaced = sorted({unit_of(m) for m in graph} - set(LAYER_OF))
    assert not unplaced, f"place these in LAYERS (and docs/architecture.md): {unplaced}"


def test_no_two_modules_import_each_other(graph):
    assert circles(graph) == []


def test_no_two_packages_import_each_other(graph):
    assert circles(unit_graph(graph)) == []


def test_nothing_is_imported_from_its_own_layer_or_above(graph):
    assert layer_violations(graph) == []


def test_the_checks_see_late_imports_circles_and_upward_imports(tmp_path):
    """The walker itself: an import inside a function counts, and each rule fires on a tree that breaks it."""
    core = tmp_path / "core"
    (core / "store").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "store" / "__init__.py").write_text("")
    (core / "config.py").write_text("def f():\n    from core.store.format import X\n")
    (core / "store" / "format.py").write_text("from core import config\nX = 1\n")
    g = import_graph(tmp_path, ["core"])
    assert g["core.config"] == {"core.store.format"}  # the function-body import
    assert g["core.store.format"] == {"core.config"}
    assert circles(g) == [["core.config", "core.store.format"]]
    assert circles(unit_graph(g)) == [["core.config", "core.store"]]
    assert layer_violations(g) == ["core.config (core.config) imports core.store.format (core.store)"]
