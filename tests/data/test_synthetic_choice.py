"""Synthetic multiple-choice problems in LLM-Adapters' commonsense format."""

import json
import re
from collections import Counter

import pytest

from peft_bayes.data import load_records
from peft_bayes.data.answers import extract_answer, infer_task
from peft_bayes.data.synthetic import make_arithmetic_problems, make_choice_problems, write_choice_data
from peft_bayes.errors import InputError

FORMAT = re.compile(
    r"Please choose the correct answer to the question: (?P<q>.+)\n\n(?P<opts>(?:Answer\d: -?\d+ ?)+)\n\n"
    r"Answer format: (?P<labels>answer\d(?:/answer\d)*)"
)


def parse(record: dict) -> tuple[str, list[int], list[str]]:
    m = FORMAT.fullmatch(record["instruction"])
    assert m, record["instruction"]
    values = [int(v) for v in re.findall(r"Answer\d: (-?\d+)", m.group("opts"))]
    assert re.findall(r"Answer(\d):", m.group("opts")) == [str(i) for i in range(1, len(values) + 1)]
    return m.group("q"), values, m.group("labels").split("/")


@pytest.mark.parametrize("n_options", [2, 4, 5])
def test_arithmetic_choice_format_and_answers(n_options):
    records = make_choice_problems(60, seed=2, n_options=n_options)
    originals = make_arithmetic_problems(60, seed=2)
    for rec, orig in zip(records, originals):
        assert set(rec) == {"instruction", "input", "output", "answer"} and rec["input"] == ""
        question, values, labels = parse(rec)
        assert question == orig["instruction"]  # the arithmetic problem, reused
        assert labels == [f"answer{i}" for i in range(1, n_options + 1)] and len(values) == n_options
        assert len(set(values)) == n_options and min(values) >= 0  # distinct distractors
        assert rec["output"] == f"the correct answer is {rec['answer']}"
        assert values[labels.index(rec["answer"])] == int(orig["answer"])
        # The evaluation pipeline reads it as intended: the label extracted from the output is the answer.
        assert extract_answer(rec["output"], infer_task([rec])) == rec["answer"]


def test_correct_position_is_uniform():
    counts = Counter(r["answer"] for r in make_choice_problems(800, seed=0, n_options=4))
    assert set(counts) == {"answer1", "answer2", "answer3", "answer4"}
    assert all(150 <= c <= 250 for c in counts.values()), counts  # 200 expected, sd ~12


def test_compare_kind():
    records = make_choice_problems(50, seed=1, n_options=3, kind="compare")
    assert len({r["instruction"] for r in records}) == 50
    for rec in records:
        question, values, labels = parse(rec)
        assert question == "Which of these numbers is the largest?" and len(set(values)) == 3
        assert values[labels.index(rec["answer"])] == max(values)


def test_deterministic_and_bounds():
    assert make_choice_problems(20, seed=4) == make_choice_problems(20, seed=4)
    assert make_choice_problems(20, seed=4) != make_choice_problems(20, seed=5)
    for kwargs, match in [
        ({"kind": "odd"}, "kind"),
        ({"n_options": 1}, "n_options"),
        ({"n_options": 10}, "n_options"),
    ]:
        with pytest.raises(InputError, match=match):
            make_choice_problems(3, **kwargs)
    with pytest.raises(InputError, match="n must"):
        make_choice_problems(-1)


@pytest.mark.parametrize("kind", ["arithmetic", "compare"])
def test_write_choice_data(tmp_path, kind):
    train_path, test_path = write_choice_data(str(tmp_path / kind), n_train=40, n_test=10, seed=3, kind=kind)
    train, test = (json.loads(open(p).read()) for p in (train_path, test_path))
    assert (len(train), len(test)) == (40, 10)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    if kind == "arithmetic":  # distinct problems, not only distinct option lists
        assert not {parse(r)[0] for r in train} & {parse(r)[0] for r in test}
    assert len(load_records(train_path)) == 40
    assert len(load_records(test_path, required=("instruction", "answer"))) == 10
    assert {p.name for p in tmp_path.joinpath(kind).iterdir()} == {"train.json", "test.json"}  # no temp files
