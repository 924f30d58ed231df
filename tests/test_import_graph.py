"""Imports point one way (README "Layout"): base <- platform <- models <- checkpoint, data <- training,
inference <- entry points, and no module imports another in a circle.

Read with ``ast`` from the source tree, function-local imports included (a
circle hidden in a function is still a circle).  An edge goes to the module an
import names: ``from pkg import sub`` is an edge to ``pkg.sub`` when ``sub`` is a
module, else to ``pkg``.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mindspeed_mm", "checkpoint")

# Layer of each room; a module may import its own room or a lower layer only.
LAYERS = {
    "mindspeed_mm": 0,  # errors, constants, jsonio: the base every room may use
    "mindspeed_mm.platform": 1,
    "mindspeed_mm.models": 2,
    "checkpoint": 3,
    "mindspeed_mm.data": 3,
    "mindspeed_mm.training": 4,
    "mindspeed_mm.inference": 4,
}


def _modules():
    """{dotted name: path} of every module of the library and conversion packages."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imports(name, path):
    """The project modules ``name`` imports, anywhere in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                sub = f"{module}.{a.name}"
                targets.add(sub if sub in MODULES else module)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module):
    """The longest LAYERS key that ``module`` is in."""
    best = None
    for room in LAYERS:
        if module == room or module.startswith(room + "."):
            if best is None or len(room) > len(best):
                best = room
    return best


def test_every_module_has_a_room():
    assert all(_room(m) for m in MODULES), [m for m in MODULES if not _room(m)]


def test_models_import_no_conversion_training_or_inference():
    bad = {m: sorted(t for t in deps if _room(t) not in ("mindspeed_mm", "mindspeed_mm.platform",
                                                            "mindspeed_mm.models"))
           for m, deps in GRAPH.items() if _room(m) == "mindspeed_mm.models"}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    room = _room(module)
    wrong = sorted(t for t in GRAPH[module] if _room(t) != room and LAYERS[_room(t)] >= LAYERS[room])
    assert not wrong, f"{module} ({room}) imports {wrong}: imports must point to a lower layer"


def test_no_import_cycles():
    """Depth-first search for a back edge; the message shows the circle."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_graph_is_read():
    """Guards against a scanner that finds nothing (and so passes everything)."""
    assert "mindspeed_mm.models.mapping" in GRAPH["mindspeed_mm.models.sharding"]
    assert "mindspeed_mm.models.qwen2vl" in GRAPH["checkpoint.hf_io"] or \
        "mindspeed_mm.models" in GRAPH["checkpoint.hf_io"]
