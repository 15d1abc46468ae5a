"""The house's floors, read from the source: imports run one way, from the top down.

    method files    mfsr, model, vae, degrade     import only each other and their libraries
    above them      plumbing/, fastjvp.py         wrap the method files (and each other) from above
    programs        train.py, sample.py           build what they run from model.py and vae.py
    apart           tools/, experiments/, tests/  nothing below imports them
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = ("mfsr", "model", "vae", "degrade")
PROGRAMS = ("train", "sample")
APART = ("tools", "experiments", "tests")


def _modules():
    """{module name: path} of every project module: the flat files, plumbing's, tools' and experiments'."""
    found = {}
    for f in os.listdir(ROOT):
        if f.endswith(".py") and not f.startswith("test_"):
            found[f[:-3]] = os.path.join(ROOT, f)
    for folder, prefix in (("plumbing", "plumbing."), ("tools", ""), ("experiments", ""),
                           (os.path.join("experiments", "benches"), "benches.")):
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith(".py") and f != "__init__.py":
                found[prefix + f[:-3]] = os.path.join(ROOT, folder, f)
    return found


def _imports(path, known):
    """The project modules a file imports, at the top or inside a function: 'model', 'plumbing.runs', ..."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}     # from plumbing import runs
    return {n for n in names if n in known}


def _floor(name):
    if name in METHOD:
        return 0
    if name.startswith("plumbing.") or name == "fastjvp":
        return 1
    if name in PROGRAMS:
        return 2
    return 3                                         # tools/, experiments/


@pytest.fixture(scope="module")
def graph():
    known = _modules()
    return {m: _imports(p, known) - {m} for m, p in known.items()}


def test_the_method_files_are_the_ground_floor(graph):
    """mfsr, model, vae and degrade import only each other (e.g. vae.py importing plumbing/ fails)."""
    for m in METHOD:
        assert graph[m] <= set(METHOD), f"{m}.py imports {sorted(graph[m] - set(METHOD))} from above its floor"


def test_no_import_runs_back_up(graph):
    """Every arrow points to a floor below its file or to the same floor: plumbing/ and fastjvp.py
    never import the programs, tools/ or experiments/; train.py and sample.py never each other."""
    assert "plumbing.checkpoints" in graph["sample"] and "model" in graph["plumbing.checkpoints"]  # the graph is read
    assert "benches.common" in graph["benches.quality"] and "sample" in graph["benches.sampling"]
    for m, deps in graph.items():
        for d in deps:
            assert _floor(d) <= _floor(m), f"{m} imports {d}, a floor above it"
    assert not graph["train"] & {"sample"} and not graph["sample"] & {"train"}
    assert graph["fastjvp"] <= set(METHOD), "fastjvp.py builds on the method files alone"


def test_the_programs_show_what_they_build(graph):
    """train.py and sample.py import model.py and vae.py themselves, not only through the plumbing."""
    for p in PROGRAMS:
        assert {"model", "vae"} <= graph[p], f"{p}.py does not import {sorted({'model', 'vae'} - graph[p])}"


def test_the_imports_form_no_circle(graph):
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for d in graph.get(m, ()):
                visit(d, path + [m])
            state[m] = "done"
    for m in graph:
        visit(m, [])
