"""Every code block of the README and of the site runs as a test (how each kind is run: tests/docs/code_blocks.py).
A block the tests cannot run says so with a ``<!-- docs-test: skip REASON -->`` marker, visible in the Markdown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import code_blocks as cb  # noqa: E402

ALL = [b for page in cb.pages() for b in cb.blocks(page)]
SHELL = [b for b in ALL if b.lang in cb.SHELL and "skip" not in b.marks]
PYTHON_PAGES = sorted({b.page for b in ALL if b.lang == "python" and not {"skip", "setup"} & set(b.marks)})
SETUP = [b for b in ALL if "setup" in b.marks]


def test_every_block_is_shell_python_or_data():
    kinds = {b.lang for b in ALL}
    assert kinds <= {"", "bash", "python", "json", "text", "yaml", "toml", "markdown"}, kinds
    assert len(SETUP) == 1, [b.id for b in SETUP]  # one setup, in the posteriors' index
    unmarked = [b.id for b in ALL if b.lang == "" and b.body.lstrip().startswith(("python ", "pip ", "make "))]
    assert not unmarked, f"commands in a block without a language are never checked: {unmarked}"


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
def test_shell_block_agrees_with_the_code(block):
    assert cb.check_shell(block) == []


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch, request):
    """A page's Python blocks run in order in one namespace, in a scratch folder; blocks marked uses-setup continue
    from the setup block of the posteriors' index."""
    mine = [b for b in ALL if b.page == page and b.lang == "python" and not {"skip", "setup"} & set(b.marks)]
    if any("real-model" in b.marks for b in mine):
        request.getfixturevalue("smollm2_cache")  # skips where the packaged model is not installed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__docs__"}
    if any("uses-setup" in b.marks for b in mine):
        exec(compile(SETUP[0].body, SETUP[0].id, "exec"), namespace)  # noqa: S102 - the documentation's own code
    for block in mine:
        exec(compile(block.body, block.id, "exec"), namespace)  # noqa: S102


RUN = [b for b in SHELL if "run" in b.marks]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_shell_blocks_marked_run_print_what_they_say(block, request):
    if "smollm2-135m" in block.body:
        request.getfixturevalue("smollm2_cache")  # skips where the packaged model is not installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        ["bash", "-c", block.body], cwd=cb.ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected in re.findall(r"#\s*->\s*(.+)$", block.body, re.M):
        assert expected.strip() in proc.stdout, (expected, proc.stdout[-2000:])


def test_the_shell_checker_catches_drift():
    """Each check can fail: an unknown flag, a bad choice, a missing make target, a bench flag that is gone."""
    cases = {
        "python train.py --base_model m --data_path d --lora_rank 8": "unrecognized arguments: --lora_rank 8",
        "python evaluate.py ... --posterior laplac": "invalid choice 'laplac'",
        "torchrun --nproc_per_node 2 train.py --adapter_name lora --batch_sise 4": "--batch_sise",
        "make demo-reall": "no target 'demo-reall'",
        "python bench/real_model_calibration.py --n_trian 3": "unknown flag --n_trian",
        "bash bench/gpu_check.sh --dry-rum": "unknown flag --dry-rum",
        "python - <<'EOF'\nprint(\nEOF": "does not compile",
        "curl http://example.com": "not a command the docs tests know",
    }
    for text, expected in cases.items():
        block = cb.Block("x.md", 1, "bash", text + "\n", ())
        problems = cb.check_shell(block)
        assert len(problems) == 1 and expected in problems[0], (text, problems)
    fine = (
        "DATA=x\nfor ds in a b; do\n  python evaluate.py --dataset $ds --data_dir $DATA \\\n    --batch_size 4\ndone\n"
    )
    assert cb.check_shell(cb.Block("x.md", 1, "bash", fine, ())) == []


def test_markers_are_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skipp -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test marker 'skipp'"):
        cb.blocks(page)
    page.write_text("<!-- docs-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="needs its reason"):
        cb.blocks(page)
    assert os.path.exists(page)
