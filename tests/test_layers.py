"""The package's layers, read from the code: no import circle, no import that runs up a layer.

Every ``import`` statement of every module is parsed, function-level ones included (a lazy import still ties two
modules together). A folder (or top-level module) is a layer; each layer may import only the gradscope layers
and the third-party packages listed for it below. Adding a module to a layer needs no change here; adding a layer
does, on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradscope"

#: layer -> the gradscope layers it may import (itself always allowed).
ALLOWED = {
    "errors": set(),
    "schema": set(),
    "store": {"errors", "schema"},
    "engine": {"errors", "schema", "store"},
    "analysis": {"errors", "schema", "store"},
    "theory": {"errors", "schema"},
    "agreement": {"errors", "schema", "analysis", "theory"},
    "models": {"errors", "schema"},
    "data": {"errors", "schema"},
    "render": {"errors", "schema", "store", "analysis", "theory", "agreement"},
    "study": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "models", "data"},
    "integrations": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "render"},
    "pipeline": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "models", "data",
                 "render", "study"},
    "cli": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "models", "data", "render",
            "study", "commands", "pipeline"},
    "commands": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "models", "data",
                 "render", "study", "pipeline"},
    "testing": {"errors", "schema", "engine", "analysis"},
    "__main__": {"cli"},
    "__init__": {"errors", "schema", "store", "engine", "analysis", "theory", "agreement", "render", "models",
                 "data", "study", "testing", "pipeline"},
    "words": set(),
}
for _layer, _rules in ALLOWED.items():  # the vocabulary (gradscope.words) imports nothing; every layer may use it
    if _layer != "words":
        _rules.add("words")

#: third-party packages a layer must never import (the stdlib and numpy are fine everywhere).
FORBIDDEN = {
    "errors": {"torch", "pandas", "pyarrow", "matplotlib", "seaborn", "rich"},
    "words": {"torch", "pandas", "pyarrow", "numpy", "matplotlib", "seaborn", "rich"},
    "schema": {"torch", "pandas", "pyarrow", "matplotlib", "seaborn", "rich"},
    "store": {"torch", "matplotlib", "seaborn", "rich"},
    "engine": {"pandas", "pyarrow", "matplotlib", "seaborn", "rich"},
    "analysis": {"torch", "matplotlib", "seaborn", "rich"},
    "theory": {"torch", "pandas", "pyarrow", "matplotlib", "seaborn", "rich", "numpy"},
    "agreement": {"torch", "matplotlib", "seaborn", "rich"},
    "models": {"pandas", "pyarrow", "matplotlib", "seaborn", "rich"},
    "data": {"pandas", "pyarrow", "matplotlib", "seaborn", "rich"},
    "render": {"torch"},
    "study": {"matplotlib", "seaborn", "rich"},
    "testing": {"matplotlib", "seaborn", "rich"},
}
#: optional integrations: only the integrations layer may import them.
OPTIONAL = {"lightning", "pytorch_lightning", "transformers", "wandb", "mlflow", "tensorboard", "torchvision",
            "timm"}  # plotly is a required dependency (the report's interactive figures)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports_of(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from gradscope.x import y`` may name a submodule y: that is an import of gradscope.x.y (and of
            # gradscope.x only when some other name is not a submodule)
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            out.extend(subs)
            if len(subs) < len(node.names):
                out.append(mod)
    return out


def _is_module(name: str) -> bool:
    if not name.startswith("gradscope"):
        return False
    rel = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: sorted({i for i in imports_of(p) if i.startswith("gradscope")} - {m}) for m, p in MODULES.items()}


def test_every_layer_is_known():
    assert {layer_of(m) for m in MODULES} <= set(ALLOWED), "a new layer: add it to ALLOWED with its rules"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up_a_layer(module):
    layer = layer_of(module)
    allowed = ALLOWED[layer] | {layer}
    bad = [i for i in GRAPH[module] if i != "gradscope" and layer_of(i) not in allowed]
    if layer != "__init__":
        bad += [i for i in GRAPH[module] if i == "gradscope"]  # the public face is for users, not for layers
    assert not bad, f"{module} ({layer}) imports {bad}; {layer} may import {sorted(ALLOWED[layer])}"
    third = {i.split(".")[0] for i in imports_of(MODULES[module]) if not i.startswith("gradscope")}
    banned = third & FORBIDDEN.get(layer, set())
    assert not banned, f"{module} ({layer}) imports {sorted(banned)}"
    if layer != "integrations":
        optional = third & OPTIONAL
        assert not optional, f"{module} imports the optional {sorted(optional)}: only gradscope.integrations may"


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one per back edge)."""
    found, colour, stack = [], {}, []

    def visit(node: str) -> None:
        colour[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt not in graph:
                continue
            if colour.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif not colour.get(nxt):
                visit(nxt)
        stack.pop()
        colour[node] = 2

    for node in graph:
        if not colour.get(node):
            visit(node)
    return found


def test_no_import_circle():
    # a package's __init__ importing its own submodules is not a circle of layers; submodules importing their
    # package's __init__ back is
    graph = {m: [i for i in deps if not (i.startswith(m + ".") and "." in i)] for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_import_parsing_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    src = PACKAGE / "analysis" / "__init__.py"
    assert "gradscope.schema" in imports_of(src)
    code = "def f():\n    from gradscope.render import plots\n    import torch\n"
    fake = PACKAGE / "analysis" / "_probe_for_test.py"
    fake.write_text(code)
    try:
        got = imports_of(fake)
    finally:
        fake.unlink()
    assert "gradscope.render.plots" in got and "torch" in got
