"""The package's layers, read from its source: no import cycles, and the lower layers never import the upper ones.

Only module-level imports count as edges: they run when a module is first imported, so a cycle among them makes
the result depend on which module a user happens to import first. Imports inside functions run later, once every
module has loaded, and are how an upper layer is reached on demand (e.g. the `zoo:` judge names); they are listed
by `python tests/test_import_layers.py` but not refused.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tta"
# Lower layers and the upper layers they must not import at module level.
LOWER = ("tta.generative", "tta.models", "tta.data")
UPPER = ("tta.bench", "tta.zoo", "tta.cli")

Edges = Dict[str, Set[str]]


def module_files() -> Dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: Dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _targets(node: ast.stmt, module: str, files: Dict[str, Path]) -> List[str]:
    """The modules of the package an import statement loads: the named module, and each enclosing package that
    does not also enclose the importer (Python runs a package's __init__ before any of its submodules)."""
    named: List[str] = []
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if _is_package(module, files) else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # `from pkg import name` loads pkg.name when that is a submodule, else pkg (name is an attribute).
        named = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
    out = []
    for name in named:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        parts = name.split(".")
        while parts and ".".join(parts) not in files:  # `import tta.x.attr` style names: keep the module part
            parts.pop()
        for i in range(2, len(parts) + 1):
            target = ".".join(parts[:i])
            if target != module and not (module + ".").startswith(target + "."):
                out.append(target)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> Tuple[Edges, Edges]:
    """(module-level edges, function-level edges) between the modules of the package."""
    files = module_files()
    top: Edges = {m: set() for m in files}
    inner: Edges = {m: set() for m in files}

    def visit(node: ast.AST, module: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue  # never runs
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top)[module].update(_targets(child, module, files))
            visit(child, module, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.Lambda)))

    for module, path in files.items():
        visit(ast.parse(path.read_text(), str(path)), module, False)
    return top, inner


def cycles(edges: Edges) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a closed path."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_path_through(c, edges) for c in components]


def _path_through(component: List[str], edges: Edges) -> List[str]:
    """A shortest closed path inside a component, from its first module back to itself (breadth first)."""
    inside = set(component)
    start = component[0]
    previous: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in previous and w != start:
                    previous[w] = v
                    following.append(w)
        frontier = following
    return component


def upward(edges: Edges) -> List[Tuple[str, str]]:
    """Module-level imports of an upper layer (bench, zoo, cli) by a lower one (generative, models, data)."""
    def within(module: str, layers) -> bool:
        return any(module == layer or module.startswith(layer + ".") for layer in layers)
    return sorted((a, b) for a, targets in edges.items() if within(a, LOWER) for b in targets if within(b, UPPER))


def test_no_module_level_import_cycle():
    top, _ = import_graph()
    found = cycles(top)
    assert not found, ("module-level import cycles (move the shared code below both modules, or import inside "
                       "the function that needs it, with a comment why):\n"
                       + "\n".join(" -> ".join(c) for c in found))


def test_lower_layers_do_not_import_upper_ones():
    top, _ = import_graph()
    found = upward(top)
    assert not found, (f"{', '.join(LOWER)} must not import {', '.join(UPPER)} at module level; register into a "
                       "lower registry instead (as the zoo does with MODEL_SOURCES and JUDGE_SOURCES):\n"
                       + "\n".join(f"{a} -> {b}" for a, b in found))


def test_the_graph_sees_imports():
    """The checks above pass vacuously if the parser misses imports: a few edges that must be there."""
    top, inner = import_graph()
    assert "tta.registry" in top["tta.models.sources"]
    assert "tta.models.hub" in top["tta.generative.loading"] and "tta.models" in top["tta.generative.loading"]
    assert "tta.methods" in top["tta"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.slow  # a fresh interpreter
def test_zoo_judges_resolve_with_only_the_generative_package_imported():
    """The zoo registers its `zoo:` judges into tta.generative, which never imports the zoo itself: importing
    tta.generative runs tta/__init__.py, which imports the zoo (and not the harness)."""
    code = ("import sys, tta.generative as g; b = g.create_judge('zoo:fmnist-judge'); "
            "print(b.source, 'tta.bench' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    source, bench_loaded = done.stdout.split()
    assert source.startswith("pixel-unet:") and source.endswith("fmnist-judge") and bench_loaded == "False"


def _closing(edges: Edges, inner: Edges) -> List[List[str]]:
    """For each function-level import a -> b that closes a cycle: the shortest path b -> ... -> a back."""
    out = []
    for a in sorted(inner):
        for b in sorted(inner[a]):
            previous: Dict[str, str] = {b: ""}
            frontier = [b]
            while frontier and a not in previous:
                frontier = [w for v in frontier for w in sorted(edges[v]) if w not in previous
                            and previous.setdefault(w, v) == v]
            if a in previous:
                path = [a]
                while path[-1] != b:
                    path.append(previous[path[-1]])
                out.append([a] + path[::-1])
    return out


if __name__ == "__main__":  # a report of the graph: cycles with and without function-level imports
    top, inner = import_graph()
    both = {m: top[m] | inner[m] for m in top}
    print("module-level cycles:", *[" -> ".join(c) for c in cycles(top)] or ["none"], sep="\n  ")
    print("function-level imports that close a cycle (the import, then the way back):",
          *[" -> ".join(c) for c in _closing(both, inner)] or ["none"], sep="\n  ")
    print("upward module-level imports:", *[f"{a} -> {b}" for a, b in upward(top)] or ["none"], sep="\n  ")
    print("upward function-level imports:", *[f"{a} -> {b}" for a, b in upward(inner)] or ["none"], sep="\n  ")
