"""The reading path's layout: imports run one way (the card's files -> plumbing/ -> nothing above it)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = ("mfsr", "model", "vae", "degrade", "train", "sample", "fastjvp")
PROGRAMS = ("train", "sample")


def _imports(path):
    """The project modules a file imports (top level or inside functions): 'model', 'plumbing.runs', ..."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "plumbing":
                found |= {f"plumbing.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in CARD + ("plumbing",)}


def _graph():
    files = {m: os.path.join(ROOT, m + ".py") for m in CARD}
    for f in os.listdir(os.path.join(ROOT, "plumbing")):
        if f.endswith(".py") and f != "__init__.py":
            files["plumbing." + f[:-3]] = os.path.join(ROOT, "plumbing", f)
    return {m: _imports(p) - {m, "plumbing"} for m, p in files.items()}


def test_plumbing_never_imports_the_programs_and_train_never_imports_sample():
    graph = _graph()
    assert "plumbing.checkpoints" in graph["sample"] & graph["train"]     # the graph sees the package's modules
    for mod, deps in graph.items():
        if mod.startswith("plumbing."):
            assert not deps & set(PROGRAMS), (mod, deps)
    assert "sample" not in graph["train"]
    for tool in os.listdir(os.path.join(ROOT, "tools")):
        if tool.endswith(".py"):
            assert "sample" not in _imports(os.path.join(ROOT, "tools", tool)), tool


def test_the_imports_form_no_circle():
    graph = _graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = "done"
    for m in graph:
        visit(m, [])
    assert not graph["model"] and not graph["mfsr"] and graph["fastjvp"] == {"model"}   # the ground floor: method files
