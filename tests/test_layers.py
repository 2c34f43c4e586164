"""The package's layers import downward only (DESIGN.md): cli → evaluation → posterior, tuners, data, metrics →
kernels; kernels import nothing of ours. Checked on the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_bayes

PACKAGE = Path(peft_bayes.__file__).parent
# layer -> the layers it may import (itself included); top-level modules not listed are shared utilities
ALLOWED = {
    "cli": {"cli", "evaluation", "posterior", "tuners", "data", "metrics", "kernels"},
    "evaluation": {"evaluation", "posterior", "tuners", "data", "metrics", "kernels"},
    "posterior": {"posterior", "tuners", "data", "metrics", "kernels"},
    "tuners": {"tuners", "kernels"},
    "data": {"data"},
    "kernels": {"kernels"},
}
LAYERED = set(ALLOWED) | {"metrics"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.startswith("peft_bayes.")]


def _layer_of(module: str) -> str | None:
    part = module.split(".")[1]
    return part if part in LAYERED else None


def test_layers_import_downward_only():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for module in _imports(path):
                target = _layer_of(module)
                if target is not None and target not in allowed:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert wrong == []


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from peft_bayes.cli.evaluate import main\n")
    assert _imports(bad) == ["peft_bayes.cli.evaluate"] and _layer_of("peft_bayes.cli.evaluate") == "cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from peft_bayes.x import y`` counts as ``peft_bayes.x.y`` where
    that is a module, else ``peft_bayes.x``), every import statement included, also inside functions."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[_module_name(path)] = {d for d in deps if d in modules and d != _module_name(path)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _function_level_imports(path: Path) -> list[str]:
    """``file:line module`` of every import of the package's own modules inside a function of ``path``."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                found += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("peft_bayes")]
    return found


def test_the_package_imports_its_own_modules_at_the_top():
    """No import of our own modules hides inside a function (they dodged cycles before): heavy optional
    dependencies (matplotlib, gradio, triton, bitsandbytes) may be deferred, our modules may not."""
    assert [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _function_level_imports(path)] == []


def test_the_function_level_check_sees_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\n\ndef f():\n    import peft_bayes.io\n    from peft_bayes import errors\n    import json\n"
    )
    assert _function_level_imports(bad) == ["bad.py:4 peft_bayes.io", "bad.py:5 peft_bayes"]
