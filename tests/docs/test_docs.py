"""The documentation site: the generated flag pages match the parsers, the site builds with ``mkdocs build --strict``,
and the public names of ``peft_bayes.__all__`` carry docstrings."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peft_bayes

ROOT = Path(__file__).resolve().parents[2]


def _gen_flags():
    """docs/gen_flags.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_flags", ROOT / "docs" / "gen_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_pages_equal_what_the_parsers_give():
    gen = _gen_flags()
    pages = gen.render_all()
    assert sorted(p.name for p in pages) == ["evaluate.md", "generate.md", "train.md"]
    for path, text in pages.items():
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run python docs/gen_flags.py"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: a script's flags changed; run python docs/gen_flags.py"
        )


def test_flag_pages_list_every_flag_and_no_machine_paths(monkeypatch):
    gen = _gen_flags()
    monkeypatch.setenv("PEFT_BAYES_DATA_DIR", str(ROOT / "somewhere"))  # an environment default must not leak in
    for script in gen.SCRIPTS:
        text = gen.render(script)
        parser = gen.build_parser(script)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, f"{script}: {flag} missing from its flag page"
        assert str(ROOT) not in text, f"{script}: the repository's path in its flag page"
        assert not re.search(r"0x[0-9a-f]{6,}", text), f"{script}: a memory address in its flag page"
    assert "somewhere" not in gen.render("evaluate")


def test_check_names_a_stale_page(tmp_path, monkeypatch, capsys):
    gen = _gen_flags()
    monkeypatch.setattr(gen, "FLAGS_DIR", tmp_path)
    assert gen.main([]) == 0  # writes the three pages into tmp_path
    assert gen.main(["--check"]) == 0
    page = tmp_path / "evaluate.md"
    page.write_text(page.read_text(encoding="utf-8").replace("`--limit`", "`--limits`"), encoding="utf-8")
    capsys.readouterr()
    assert gen.main(["--check"]) == 1
    assert "evaluate.md" in capsys.readouterr().err


def _missing_site_tools() -> list[str]:
    wanted = {
        "mkdocs": "mkdocs",
        "material": "mkdocs-material",
        "mkdocstrings_handlers.python": "mkdocstrings[python]",
    }
    missing = []
    for module, package in wanted.items():
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # a missing parent package
            found = None
        if found is None:
            missing.append(package)
    return missing


def test_site_builds_strict(tmp_path):
    missing = _missing_site_tools()
    if missing:
        pytest.skip(f"the site needs {', '.join(missing)}: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    for page in ("index.html", "reference/flags/train/index.html", "api/index.html", "posteriors/laplace/index.html"):
        assert (site / page).is_file(), f"{page} was not built"


def _public_callables() -> list[tuple[str, object]]:
    names = []
    for name in peft_bayes.__all__:
        obj = getattr(peft_bayes, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.append((name, obj))
    return names


def test_public_names_have_docstrings():
    undocumented = [name for name, obj in _public_callables() if not (obj.__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_public_functions_document_their_arguments():
    missing = []
    for name, obj in _public_callables():
        if not inspect.isfunction(obj):
            continue
        params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        if params and "Args:" not in (obj.__doc__ or ""):
            missing.append(name)
    assert not missing, f"public functions with parameters but no Args: section: {missing}"
