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
