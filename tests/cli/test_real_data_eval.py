"""evaluate.py end to end on the real LLM-Adapters test sets (20 examples each), where ``../shared/data`` exists.

The tiny random llama answers nonsense; what is checked is the plumbing: ``--dataset NAME --data_dir DIR`` finds
the file, the first 20 records are evaluated in file order with their gold answers, math answers are extracted
with the dataset's rule, and multiple-choice sets are scored over each question's own options (ARC: 3-5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.data.answers import TASKS, extract_answer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm-adapters"
DATASET_DIR = DATA / "dataset"
MATH = ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps"]
N = 20

pytestmark = pytest.mark.skipif(
    not DATASET_DIR.is_dir(), reason=f"real data absent: {DATASET_DIR} (CI has it at ../shared/data)"
)


CHOICE = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]


def _run_real(name, llama_dir, tmp_path, *extra):
    test_json = DATASET_DIR / name / "test.json"
    if not test_json.is_file():
        pytest.skip(f"{test_json} absent")
    file_records = json.loads(test_json.read_text(encoding="utf-8"))[:N]
    argv = [
        "--base_model", llama_dir, "--dataset", name, "--data_dir", str(DATASET_DIR), "--limit", str(N),
        "--max_new_tokens", "4", "--batch_size", str(N), "--output_dir", str(tmp_path), "--quiet", *extra,
    ]  # fmt: skip
    assert evaluate_main(argv) == 0
    return test_json, file_records


@pytest.mark.parametrize("name", MATH)
def test_evaluate_real_test_set(name, llama_dir, tmp_path):
    test_json, file_records = _run_real(name, llama_dir, tmp_path)

    summary = json.loads((tmp_path / f"{name}_summary.json").read_text())
    rows = json.loads((tmp_path / f"{name}_predictions.json").read_text())
    assert summary["dataset"] == name and summary["data_path"] == str(test_json)
    assert summary["n"] == N == len(rows)
    assert [r["gold"] for r in rows] == [str(r["answer"]) for r in file_records]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in file_records]
    assert summary["correct"] == sum(r["correct"] for r in rows)
    assert math.isclose(summary["accuracy"], summary["correct"] / N)

    task = TASKS[name]  # the catalogued extraction rule is the one applied
    assert all(r["extracted"] == extract_answer(r["generation"], task) for r in rows)
    if task.kind != "number":
        assert all(r["extracted"] is None or r["extracted"] in task.labels for r in rows)


@pytest.mark.parametrize("name", CHOICE)
def test_evaluate_real_choice_set(name, llama_dir, tmp_path):
    _, file_records = _run_real(name, llama_dir, tmp_path)
    summary = json.loads((tmp_path / f"{name}_summary.json").read_text())
    rows = json.loads((tmp_path / f"{name}_predictions.json").read_text())
    assert summary["scoring"] == "option-likelihood" and summary["n"] == N == len(rows)
    assert math.isclose(summary["accuracy_percent"], 100 * sum(r["correct"] for r in rows) / N)
    for row, rec in zip(rows, file_records):
        # The options are the question's own labels (ARC questions have 3 to 5), and the gold is one of them.
        assert row["options"] == rec["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
        assert row["gold"] in row["options"] and math.isclose(sum(row["probs"]), 1, abs_tol=1e-9)
    assert (tmp_path / f"{name}_reliability.png").is_file()


def test_real_ood_openbookqa_vs_arc(llama_dir, tmp_path):
    """BLoB's OOD protocol on the real files: openbookqa in distribution, ARC-Challenge out of it."""
    if not (DATASET_DIR / "ARC-Challenge" / "test.json").is_file():
        pytest.skip("ARC-Challenge absent")
    _run_real("openbookqa", llama_dir, tmp_path, "--ood_dataset", "ARC-Challenge")
    summary = json.loads((tmp_path / "openbookqa_summary.json").read_text())
    assert summary["ood_dataset"] == "ARC-Challenge" and summary["ood_n"] == N
    assert 0 <= summary["ood_auroc"] <= 1
