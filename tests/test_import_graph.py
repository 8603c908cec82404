"""The package's shape: imports point down the layers and never form a circle.

The graph is built from the source with `ast` (imports inside functions included, as they run
too), so the test needs nothing imported. Layers, lowest first:

  model        config, model, sharding, distributed, preemption, errors, tree (the decoder, its
               mesh and its processes)
  loading      io, data, loading, assets, checkpoint, memory (checkpoints, tokenizers, datasets,
               disk and device-memory checks)
  core         attribution, masks, generate, inference (the sequence scorer), direction
  measures     evaluate, report
  training     train
  experiments  experiments (and the `pipeline` alias)

A module may import its own layer or any layer below it (with no circle), never one above.
`harmjax/__init__.py` is the public facade over every layer and is left out as an importer.
"""

import ast
import os
import subprocess
import sys

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harmjax")

# First dotted component under harmjax -> layer. A top-level module not named here fails the
# test, so a new module has to say where it sits.
LAYERS = {
    "model": {"errors", "tree", "config", "distributed", "preemption", "sharding", "model"},
    "loading": {"io", "data", "loading", "assets", "checkpoint", "memory"},
    "core": {"attribution", "masks", "generate", "inference", "direction"},
    "measures": {"evaluate", "report"},
    "training": {"train"},
    "experiments": {"experiments", "pipeline"},
}
ORDER = list(LAYERS)
LAYER_OF = {top: ORDER.index(layer) for layer, tops in LAYERS.items() for top in tops}


def _modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name, path, known):
    """The harmjax modules `name` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            # A package's own __init__ importing its submodules (or a submodule importing its
            # package for a name) is not an arrow between layers or a circle.
            if t and t != name and not name.startswith(t + ".") and not t.startswith(name + "."):
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layer(module):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the facade
    assert parts[1] in LAYER_OF, f"{module}: harmjax.{parts[1]} is in no layer of tests/test_import_graph.py"
    return LAYER_OF[parts[1]]


def _circles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in sorted(_graph().items()):
        mine = _layer(module)
        if mine is None:
            continue
        for t in sorted(targets):
            theirs = _layer(t)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} ({ORDER[mine]}) imports {t} ({ORDER[theirs]})")
    assert upward == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The two checks above would fail on a circle and on an arrow pointing up."""
    g = {"harmjax.model.a": {"harmjax.masks.b"}, "harmjax.masks.b": {"harmjax.model.a"}}
    assert _circles(g) == [["harmjax.masks.b", "harmjax.model.a"]]
    assert _layer("harmjax.masks.b") > _layer("harmjax.model.a")


def test_import_harmjax_is_light():
    """`import harmjax` loads neither the experiments nor training nor the evaluators: they
    load on first use of their names."""
    code = ("import sys, harmjax; heavy = sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['harmjax', 'experiments'], ['harmjax', 'pipeline'], ['harmjax', 'train'], ['harmjax', 'evaluate'])); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(PKG)).stdout.strip()
    assert out == "[]"
