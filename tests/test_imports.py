"""Imports run one way (DESIGN.md, "Floors, bottom up"): no cycles among mpipar's modules,
and no module imports from a floor above its own.

Every module of mpipar/ and programs/ is parsed with ``ast``, never imported. Every import
statement counts wherever it stands: at the top, inside a function (a lazy import is
still a dependency, only a later one), under ``if TYPE_CHECKING`` or in a ``try``;
relative imports are resolved against the importing module's package. ``from P import
name`` is an edge to the module ``P.name`` where that is a module, else to ``P``;
``import a.b.c`` is an edge to ``a.b.c`` alone (the packages Python runs on the way,
``a`` and ``a.b``, are not counted). Imports of anything outside mpipar/ and programs/
are ignored.

The floors, lowest first, are ``FLOORS`` below (the one table). A module may import its
own floor or a lower one. How the modules at mpipar/*.py top level were placed, from
what they import and who imports them today:

- ``program``, ``verify``, ``reporting``, ``trace``, ``launch`` (and any other top-level
  module): ``program``, the MPI program skeleton and what a run reports, between ``cost``
  and ``serve``: they import comm, model, layout, parallel and cost (reporting prints the
  ledger beside cost's prediction), and the server is a program built on the skeleton
  (serve/server.py and serve/cli.py import program.py, serve/server.py writes a trace).
- ``bench``: the benchmark harness (mpipar/bench/), used by programs/ and tests only;
  nothing below it imports it.
- ``mpipar/__init__.py`` (the module ``mpipar``) is the top of the library: it re-exports
  ``generate`` (serve/offline.py, loaded lazily) and holds ``pin_threads``, so nothing in
  the library imports it; the benchmark harness and the programs above it may (they pin
  BLAS threads through it).
- A subpackage not named in the table (a new mpipar/x/) counts as ``program`` until it
  is given a floor here.
"""

from __future__ import annotations

import ast
import os

# ---- the floors, lowest first: (floor, module prefixes) -------------------------------
FLOORS = [
    ("comm", ["mpipar.comm"]),
    ("backend", ["mpipar.backend"]),
    ("model", ["mpipar.model"]),
    ("layout", ["mpipar.layout"]),
    ("parallel", ["mpipar.parallel"]),
    ("cost", ["mpipar.cost"]),
    ("program", ["mpipar.program", "mpipar.verify", "mpipar.reporting", "mpipar.trace",
                 "mpipar.launch"]),  # and any other mpipar.* (see above)
    ("serve", ["mpipar.serve"]),
    ("package", []),  # mpipar/__init__.py: the module ``mpipar`` itself
    ("bench", ["mpipar.bench"]),
    ("programs", ["programs"]),
]
FLOOR_RANK = {name: i for i, (name, _) in enumerate(FLOORS)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ("mpipar", "programs")


def floor_of(module: str) -> str:
    if module == "mpipar":
        return "package"
    best, floor = -1, "program"  # any other mpipar.* module
    for name, prefixes in FLOORS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), name
    return floor


# ---- parsing -----------------------------------------------------------------------
def modules_under(root: str) -> dict[str, tuple[str, bool]]:
    """module name -> (file path, is a package __init__) for every .py of TREES."""
    found = {}
    for tree in TREES:
        top = os.path.join(root, tree)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                package = rel[-1] == "__init__"
                name = ".".join(rel[:-1] if package else rel)
                found[name] = (os.path.join(dirpath, f), package)
    return found


def _known(name: str, modules) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_edges(root: str) -> dict[str, list[tuple[int, str]]]:
    """importer -> [(line, imported module)] over mpipar/ and programs/ (their modules only)."""
    modules = modules_under(root)
    edges: dict[str, list[tuple[int, str]]] = {m: [] for m in modules}
    for module, (path, package) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        here = module.split(".") if package else module.split(".")[:-1]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = node.level - 1
                    base = ".".join((here[:len(here) - up] if up else here)
                                    + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if module.startswith("programs.") and not node.level and \
                        f"programs.{base.split('.')[0]}" in modules:
                    base = f"programs.{base}"  # a program importing a sibling script
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in modules else base)
            for t in targets:
                if module.startswith("programs.") and f"programs.{t.split('.')[0]}" in modules:
                    t = f"programs.{t}"
                hit = _known(t, modules)
                if hit is not None and hit != module:
                    edges[module].append((node.lineno, hit))
    return edges


# ---- the two rules -------------------------------------------------------------------
def upward_imports(edges) -> list[str]:
    out = []
    for importer in sorted(edges):
        for line, imported in sorted(set(edges[importer])):
            a, b = floor_of(importer), floor_of(imported)
            if FLOOR_RANK[a] < FLOOR_RANK[b]:
                out.append(f"{importer} ({a}) -> {imported} ({b})   "
                           f"[{importer.replace('.', '/')}.py:{line}]")
    return out


def import_cycles(edges) -> list[str]:
    """One line per strongly connected group of mpipar modules: a shortest cycle through
    its first module, and the group's members when the cycle does not visit them all."""
    graph = {m: sorted({t for _, t in ts if t.startswith("mpipar")})
             for m, ts in edges.items() if m == "mpipar" or m.startswith("mpipar.")}
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan, iterative over the successor lists
        work = [(v, iter(graph.get(v, ())))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    lines = []
    for group in sorted(groups):
        start, members = group[0], set(group)
        paths, seen, cycle = [[start]], {start}, None
        while paths and cycle is None:  # breadth first: the shortest way back to start
            nxt = []
            for p in paths:
                for w in graph[p[-1]]:
                    if w == start:
                        cycle = p + [start]
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        nxt.append(p + [w])
                if cycle:
                    break
            paths = nxt
        text = " -> ".join(cycle)
        if len(group) > len(cycle) - 1:
            text += f"   (one group of {len(group)}: {', '.join(group)})"
        lines.append(text)
    return lines


def report(up, cycles) -> str:
    return (f"{len(up)} upward import(s) (importer -> imported, by floor: "
            f"{' < '.join(n for n, _ in FLOORS)}):\n  " + "\n  ".join(up or ["none"])
            + f"\n{len(cycles)} import cycle(s):\n  " + "\n  ".join(cycles or ["none"]))


def test_imports_point_down_and_never_round():
    edges = import_edges(ROOT)
    assert "mpipar" in edges and "mpipar.comm.ring" in edges and "programs.serve" in edges
    up, cycles = upward_imports(edges), import_cycles(edges)
    assert not up and not cycles, report(up, cycles)


# ---- the checker itself, on a package made here --------------------------------------
FAKE = {
    "mpipar/__init__.py": "def helper():\n    pass\n",
    "mpipar/comm/__init__.py": "",
    "mpipar/comm/ring.py": "import os\n\n\ndef f():\n    from ..model import layers\n",
    "mpipar/backend.py": "from mpipar import helper\nfrom .comm import tags\n",
    "mpipar/comm/tags.py": "",
    "mpipar/model/__init__.py": "from .layers import g\n",
    "mpipar/model/layers.py": "from . import config\nfrom ..backend import f\n\n\ndef g():\n"
                              "    pass\n",
    "mpipar/model/config.py": "import numpy\nimport mpipar.model.layers as L\n",
    "mpipar/cost/__init__.py": "",
    "mpipar/cost/memory.py": "from ..layout import Layout\nfrom ..model import g\n",
    "mpipar/layout.py": "from .parallel import shard\n",
    "mpipar/parallel/__init__.py": "",
    "mpipar/parallel/shard.py": "from ..comm import ring\n",
    "mpipar/serve/__init__.py": "",
    "mpipar/serve/groups.py": "try:\n    from ..runner import main\nexcept ImportError:\n"
                              "    main = None\n",
    "mpipar/runner.py": "def main():\n    from .serve import groups\n    from . import launch\n",
    "mpipar/launch.py": "",
    "mpipar/bench/__init__.py": "",
    "mpipar/bench/harness.py": "from ..runner import main\nfrom ..cost import memory as cm\n",
    "programs/tool.py": "import mpipar\nimport mpipar.bench.harness\n"
                        "from mpipar.serve import groups\nimport helper_script\n",
    "programs/helper_script.py": "from mpipar.comm.ring import f\n",
}


def test_the_checker_finds_cycles_and_upward_imports(tmp_path):
    """A package made here with known faults: a lazy relative import up (comm -> model),
    an import of the package top from below (backend -> mpipar), a lazy import up
    (runner -> serve), layout -> parallel; cycles through an absolute import
    (model.layers <-> model.config) and through a lazy one (serve.groups <-> runner).
    Everything else imports down or sideways and must not be reported."""
    for rel, text in FAKE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    edges = import_edges(str(tmp_path))
    assert sorted(t for _, t in edges["mpipar.model.layers"]) == [
        "mpipar.backend", "mpipar.model.config"]  # from . import config: the submodule
    assert ("mpipar.model", ) == tuple({t for _, t in edges["mpipar.cost.memory"]}
                                       - {"mpipar.layout"})  # a name of the package
    assert [t for _, t in edges["programs.tool"]][-1] == "programs.helper_script"
    up = upward_imports(edges)
    pairs = sorted(line.split("   [")[0] for line in up)
    assert pairs == [
        "mpipar.backend (backend) -> mpipar (package)",
        "mpipar.comm.ring (comm) -> mpipar.model.layers (model)",
        "mpipar.layout (layout) -> mpipar.parallel.shard (parallel)",
        "mpipar.runner (program) -> mpipar.serve.groups (serve)",
    ], report(up, [])
    assert "[mpipar/comm/ring.py:5]" in " ".join(up)  # the line of the lazy import
    cycles = import_cycles(edges)
    assert cycles == [
        "mpipar.model.config -> mpipar.model.layers -> mpipar.model.config",
        "mpipar.runner -> mpipar.serve.groups -> mpipar.runner",
    ], report(up, cycles)
    assert floor_of("mpipar.somewhere_new") == "program" and floor_of("mpipar") == "package"
    assert floor_of("mpipar.cost.plan") == "cost" and floor_of("mpipar.costly") == "program"
