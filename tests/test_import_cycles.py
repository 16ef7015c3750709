"""No import cycles in ``src/mergemix``.

The graph is built from the module-level imports of every module (``import`` and ``from`` statements
that run when the module is imported: at top level, in module-level ``if``/``try``/``with`` blocks and
in class bodies; not inside functions, and not under ``if TYPE_CHECKING:``), with relative imports
resolved and ``from package import name`` pointing at the submodule ``package.name`` where there is
one. The implicit import of a parent package when a submodule is imported is not an edge (every
submodule would otherwise form a cycle with an ``__init__`` that imports it). A strongly connected
component of more than one module, or a module importing itself, fails the test, naming a cycle.

Imports inside functions are how the registries reach their built-in modules (see
:mod:`mergemix.plugins`): the backend, dataset, merge-method and search-strategy modules import their
registry, never the other way round at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for the package ``package`` in folder ``root / package``."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module):
    """The Import/ImportFrom nodes that run at import time of the module."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack += node.body
            stack += node.orelse
        elif isinstance(node, ast.ClassDef):
            stack += node.body
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            stack += node.body + node.orelse + node.finalbody
            for h in node.handlers:
                stack += h.body
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            stack += node.body + getattr(node, "orelse", [])


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports at module level."""
    mods = module_files(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in mods else origin)
            for t in targets:
                # `import a.b.c` runs a.b.c; the nearest module of the package that exists
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component
    of more than one module, and per module that imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    sccs.append(sorted(comp))
    found = []
    for comp in sccs:
        if len(comp) > 1 or comp[0] in graph.get(comp[0], ()):
            found.append(_cycle_in(graph, set(comp)))
    return sorted(found)


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w not in comp:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError("not a cycle")  # pragma: no cover


def describe(found: list[list[str]]) -> str:
    return "import cycles (module-level imports):\n" + "\n".join("  " + " -> ".join(c) for c in found)


# --- the detector itself --------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_detector_finds_a_cycle_through_relative_and_package_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "import os\nfrom pkg.sub import c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from .. import a\n",  # a -> b -> c -> a
            "pkg/d.py": "def f():\n    from pkg import a\n",  # inside a function: no edge
            "pkg/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == set() and graph["pkg.e"] == set()
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a" in describe(found)


def test_detector_finds_registry_style_cycles_and_self_imports(tmp_path):
    _write(
        tmp_path,
        {
            "reg/__init__.py": "from reg.base import REGISTRY\n",
            # the old shape: the registry imports its plugins at module level, and they import it
            "reg/base.py": "REGISTRY = {}\nfrom reg import impl\n",
            "reg/impl.py": "from reg.base import REGISTRY\n",
            "reg/selfish.py": "try:\n    import reg.selfish\nexcept ImportError:\n    pass\n",
            "reg/fine.py": "class A:\n    from reg import impl\n",  # a class body runs at import: an edge, no cycle
        },
    )
    graph = import_graph(tmp_path, "reg")
    assert graph["reg.fine"] == {"reg.impl"}
    assert cycles(graph) == [["reg.base", "reg.impl", "reg.base"], ["reg.selfish", "reg.selfish"]]


def test_detector_accepts_a_tree(tmp_path):
    _write(
        tmp_path,
        {
            "ok/__init__.py": "from ok.base import X\n",
            "ok/base.py": "X = 1\ndef load():\n    from ok import impl\n",
            "ok/impl.py": "from ok.base import X\nfrom . import util\n",
            "ok/util.py": "import json\n",
        },
    )
    graph = import_graph(tmp_path, "ok")
    assert graph["ok.impl"] == {"ok.base", "ok.util"}
    assert cycles(graph) == []


# --- mergemix ------------------------------------------------------------------------------------------
def test_mergemix_has_no_import_cycles():
    graph = import_graph(SRC, "mergemix")
    assert len(graph) > 30 and "mergemix.backends.base" in graph
    found = cycles(graph)
    assert not found, describe(found)


def test_registries_do_not_import_their_members_at_all():
    """The registries name their built-ins in tables of strings (imported by mergemix.plugins on the
    first lookup); no import statement of a registry module, even inside a function, names a member."""
    graph = import_graph(SRC, "mergemix")
    members = {
        "mergemix.backends.base": {
            "mergemix.backends.smallcnn",
            "mergemix.backends.clip",
            "mergemix.backends.causal_lm",
        },
        "mergemix.data.registry": {"mergemix.data.digits", "mergemix.data.text", "mergemix.data.images"},
        "mergemix.merging": {"mergemix.merge_methods"},
        "mergemix.search.base": {
            f"mergemix.search.{m}" for m in ("exhaustive", "greedy", "beam", "optuna_tpe", "halving", "surrogate")
        },
    }
    files = module_files(SRC, "mergemix")
    for registry, mods in members.items():
        imported = set()
        for node in ast.walk(ast.parse(files[registry].read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        assert not imported & mods, (registry, imported & mods)
        assert "mergemix.plugins" in graph[registry]
        for m in mods - {"mergemix.merge_methods"}:  # the members import their registry to register themselves
            assert registry in graph[m], m
