"""The package's import graph: no cycles, and every module imports on its own.

The graph is read with `ast` from paws_cli/**/*.py and data_tools/**/*.py: an edge A -> B for every
``import paws_cli...`` / ``from paws_cli... import ...`` in A, resolved to the module B it loads (``from pkg
import mod`` is the module pkg.mod when that is a file), plus B's enclosing packages (their ``__init__`` runs
first) other than A's own. Imports at module level (class bodies and ``try:`` included, ``if TYPE_CHECKING:``
left out) must form no cycle at all. Imports inside functions run later and could be allowed to close a cycle;
none do today, so a new one fails here too unless it is listed in ALLOWED_LAZY_CYCLES with a reason.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("paws_cli", "data_tools")
#: Cycles that pass through at least one function-level import and are accepted (sorted module names).
ALLOWED_LAZY_CYCLES: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lazy: bool  # the import statement is inside a function body
    line: int


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is lazy (inside a function); TYPE_CHECKING blocks skipped."""

    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk_one(sub, lazy)
                continue
            yield from walk_one(child, lazy)

    def walk_one(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, lazy
            return
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from walk(node, inner)

    yield from walk(tree, False)


def _with_packages(target: str, source: str, modules: dict[str, Path]) -> list[str]:
    """``target`` and the enclosing packages whose __init__ importing it runs, less the source's own."""
    parts = target.split(".")
    own = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 2)}
    found = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [name for name in found if name in modules and name not in own and name != source]


def import_graph() -> list[Edge]:
    modules = module_files()
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, lazy in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.append(candidate if candidate in modules else base)
            for target in targets:
                if target.split(".")[0] not in PACKAGES:
                    continue
                edges.extend(
                    Edge(name, hit, lazy, node.lineno) for hit in _with_packages(target, name, modules)
                )
    return edges


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """One cycle (as a path A -> ... -> A) per strongly connected component that has one (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first search inside the component for the shortest way back to `start`
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & component):
                    if nxt == start:
                        found = node
                        break
                    if nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
                if found is not None:
                    break
            frontier = following
        path = [found] if found is not None else []
        while path and path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start] if path else [start, start])
    return cycles


def _describe(cycle: list[str], edges: list[Edge]) -> str:
    steps = []
    for source, target in zip(cycle, cycle[1:]):
        edge = min(
            (e for e in edges if e.source == source and e.target == target), key=lambda e: (e.lazy, e.line)
        )
        steps.append(f"{source} -> {target} (line {edge.line}{', in a function' if edge.lazy else ''})")
    return "\n  ".join(steps)


def test_the_graph_is_read() -> None:
    edges = import_graph()
    sources = {edge.source for edge in edges}
    assert {"paws_cli.cli", "paws_cli.train.loop", "paws_cli.data.sources"} <= sources
    pairs = {(edge.source, edge.target) for edge in edges}
    assert ("paws_cli.data.sources", "paws_cli.data.sampling.batch") in pairs
    assert ("paws_cli.data.sources", "paws_cli.data.backends") in pairs  # the enclosing package of a target


def test_no_import_cycle_at_module_level() -> None:
    edges = [edge for edge in import_graph() if not edge.lazy]
    cycles = find_cycles(edges)
    assert not cycles, "module-level import cycles:\n  " + "\n\n  ".join(_describe(c, edges) for c in cycles)


def test_no_import_cycle_through_function_level_imports() -> None:
    edges = import_graph()
    lazy = sorted({(e.source, e.target) for e in edges if e.lazy})
    print(f"{len(lazy)} function-level imports inside the packages:")
    for source, target in lazy:
        print(f"  {source} -> {target}")
    cycles = [c for c in find_cycles(edges) if tuple(sorted(set(c))) not in ALLOWED_LAZY_CYCLES]
    assert not cycles, "import cycles through function-level imports:\n  " + "\n\n  ".join(
        _describe(c, edges) for c in cycles
    )


_IMPORT_EACH = """
import importlib, json, sys, traceback, warnings
warnings.simplefilter("ignore")
import numpy, torch, torchvision, timm, pydantic, typer, rich  # third-party once; the packages afresh per module
results = {}
for name in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k.split(".")[0] in ("paws_cli", "data_tools")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("paws_cli", "data_tools"):
            results[name] = traceback.format_exc()
        else:
            results[name] = "optional dependency missing: " + str(exc.name)
    except Exception:
        results[name] = traceback.format_exc()
print(json.dumps(results))
"""


def test_every_module_imports_first() -> None:
    """Each module imported first, with none of the packages loaded yet (one fresh interpreter; the packages'
    modules are dropped from sys.modules before each import, third-party ones stay loaded)."""
    names = sorted(module_files())
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(names)
    skipped = {n: r for n, r in results.items() if r.startswith("optional dependency missing")}
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    failed = {n: r for n, r in results.items() if r != "ok" and n not in skipped}
    assert not failed, "\n\n".join(f"import {n} first:\n{r}" for n, r in failed.items())
