"""The layout is part of the design: layers import downward only, no module imports itself back through others,
and no package is a heap of modules. Read from the source (every import statement, at module level or inside a
function), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dfc", "workers", "service")
MAX_MODULES_PER_PACKAGE = 12

# Sub-package order inside each top-level package: a part may import the parts before it and itself, never after.
# ``spec`` is the one description of an audit that everything reads; it sits with the corpora it names.
ORDER = {
    "dfc": ["dfc", "dfc.lm", "dfc.behaviour", "dfc.analysis"],
    "workers": [
        "workers.storage",
        "workers.activations",
        "workers.spec",
        "workers.pipeline",
        "workers.report",
        "workers.analysis",
        "workers.planted",
    ],
    "service": ["service.settings", "service.submission", "service.screening", "service.api", "service.cli"],
}
TOP_ORDER = ["dfc", "workers", "service"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (``from a import b`` counts ``a.b`` if it is a
    module, else ``a``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def part_of(module: str) -> str:
    """The layer a module belongs to: the longest entry of ORDER that is it or contains it."""
    top = module.split(".")[0]
    candidates = [p for p in ORDER[top] if module == p or module.startswith(p + ".")]
    return max(candidates, key=len) if candidates else top


def test_no_module_imports_itself_back(graph: dict[str, set[str]]) -> None:
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downward_only(graph: dict[str, set[str]]) -> None:
    upward = []
    for module, targets in graph.items():
        for target in targets:
            src_top, dst_top = module.split(".")[0], target.split(".")[0]
            if src_top != dst_top:
                if TOP_ORDER.index(dst_top) > TOP_ORDER.index(src_top):
                    upward.append(f"{module} -> {target}")
                continue
            order = ORDER[src_top]
            if order.index(part_of(target)) > order.index(part_of(module)):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_service_reaches_the_science_only_through_workers(graph: dict[str, set[str]]) -> None:
    reaching = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("service") for t in ts if t.startswith("dfc")]
    assert reaching == []


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    top_level = {m for m in graph if "." in m and m.count(".") == 1 and not (ROOT / m.replace(".", "/")).is_dir()}
    unplaced = [m for m in top_level if part_of(m) == m.split(".")[0] and m.split(".")[0] != "dfc"]
    assert unplaced == [], "add the module to a sub-package, or to ORDER if it is a layer of its own"


def test_no_package_is_a_heap_of_modules() -> None:
    counts: dict[Path, int] = defaultdict(int)
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                counts[path.parent] += 1
    heaps = {str(p.relative_to(ROOT)): n for p, n in counts.items() if n > MAX_MODULES_PER_PACKAGE}
    assert heaps == {}


def test_every_package_says_what_it_is_for() -> None:
    silent = [
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("__init__.py")
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert silent == []


def test_tests_mirror_the_packages() -> None:
    """Each test folder under tests/{dfc,workers,service} names a package that exists."""
    orphans = [
        str(d.relative_to(ROOT))
        for pkg in PACKAGES
        for d in (ROOT / "tests" / pkg).rglob("*")
        if d.is_dir() and d.name != "__pycache__" and not (ROOT / d.relative_to(ROOT / "tests")).is_dir()
    ]
    assert orphans == []
