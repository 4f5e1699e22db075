"""No import cycles inside the xaijax package, counting lazy imports inside functions too.

The same rules as the project's ``tools/import_cycles.py`` (reimplemented here so that the
test does not depend on a path outside the clone): every ``import`` / ``from ... import``
anywhere in a module (module level, functions, methods, ``if TYPE_CHECKING`` blocks) is an
edge to each module of the package it names — the module ``from a.b import c`` imports from
(``a.b``, i.e. its ``__init__``) and ``a.b.c`` when ``c`` is a submodule. An edge from a module
to one of its own parent packages is dropped (a package ``__init__`` re-exporting its own
submodules makes every such edge circular), and a strongly connected component counts as a
cycle only when it holds more than one module that is not a package ``__init__``. A lazy
import hides a cycle from the interpreter, it does not remove it.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xaijax"


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` file under the package ``root``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def targets(mods: dict[str, pathlib.Path], mod: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules that the import statement ``node`` in module ``mod`` imports."""
    if isinstance(node, ast.ImportFrom):
        base = mod.split(".")
        if mods[mod].name != "__init__.py":
            base = base[:-1]  # a module's relative imports start from its package
        base = base[: len(base) - (node.level - 1)] if node.level else []
        t = ".".join(base + ([node.module] if node.module else []))
        cands = [t] + [f"{t}.{a.name}" for a in node.names]
    else:
        cands = [a.name for a in node.names]
    return [c for c in cands if c in mods]


def import_graph(root: pathlib.Path) -> tuple[dict[str, set[str]], dict[str, pathlib.Path]]:
    mods = modules(root)
    graph = {}
    for m, p in mods.items():
        deps: set[str] = set()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"), filename=str(p))):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                deps.update(targets(mods, m, n))
        graph[m] = {d for d in deps if d != m and not m.startswith(d + ".")}
    return graph, mods


def cycles(root: pathlib.Path) -> list[list[str]]:
    """Strongly connected components (Tarjan) with more than one non-``__init__`` module."""
    graph, mods = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if sum(mods[x].name != "__init__.py" for x in comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def _edges_inside(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    members = set(comp)
    return [f"  {a} -> {b}" for a in comp for b in sorted(graph[a]) if b in members]


def test_xaijax_has_no_import_cycles():
    assert (PACKAGE / "__init__.py").is_file(), PACKAGE
    found = cycles(PACKAGE)
    if found:
        graph, _ = import_graph(PACKAGE)
        report = []
        for c in found:
            report.append("import cycle: " + " <-> ".join(c))
            report.extend(_edges_inside(graph, c))
        print("\n".join(report))
        raise AssertionError(f"{len(found)} import cycle(s) in xaijax:\n" + "\n".join(report))


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_finder_sees_lazy_and_relative_cycles_and_ignores_reexports(tmp_path):
    """The finder itself: a cycle closed by a lazy import inside a function and by relative
    imports is found; a package __init__ re-exporting its submodules (which import the
    package) is not a cycle; nor is a single module with its own __init__."""
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a, sub\n",
            "pkg/a.py": "import os\nfrom pkg.sub import b\n",
            "pkg/sub/__init__.py": "from . import b\nfrom .b import thing\n",
            "pkg/sub/b.py": "from pkg import sub\nthing = 1\ndef f():\n    from ..a import os\n",
            "pkg/c.py": "from . import d\n",
            "pkg/d.py": "class K:\n    def m(self):\n        import pkg.c\n",
            "pkg/e.py": "from pkg import sub\n",
        },
    )
    found = cycles(pkg)
    assert found == [["pkg.a", "pkg.sub", "pkg.sub.b"], ["pkg.c", "pkg.d"]], found
    # without the lazy imports there is no cycle
    (pkg / "sub" / "b.py").write_text("from pkg import sub\nthing = 1\n")
    (pkg / "d.py").write_text("class K:\n    pass\n")
    assert cycles(pkg) == []
