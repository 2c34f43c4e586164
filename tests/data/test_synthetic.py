import json
import re

import pytest

from peft_bayes.data import load_records
from peft_bayes.data.synthetic import _TEMPLATES, make_arithmetic_problems, write_demo_data
from peft_bayes.errors import InputError

N_DISTINCT = 1008  # distinct (template, a, b) contents for max_operand=9


def _template_regexes() -> dict[str, re.Pattern]:
    """One regex per template; the two operands are its only capture groups."""
    fields = {"a": r"(\d+)", "b": r"(\d+)"}
    patterns = {}
    for template_id, (_, text) in _TEMPLATES.items():
        parts = re.split(r"(\{\w+\})", text)
        regex = "".join(
            fields.get(p[1:-1], r"[A-Za-z ]+?") if p.startswith("{") and p.endswith("}") else re.escape(p)
            for p in parts
        )
        patterns[template_id] = re.compile(regex + "$")
    return patterns


PATTERNS = _template_regexes()


def content(record: dict) -> tuple[str, int, int]:
    """(template id, a, b) recovered from the instruction text alone."""
    hits = [(tid, m) for tid, pat in PATTERNS.items() if (m := pat.match(record["instruction"]))]
    assert len(hits) == 1, record["instruction"]
    template_id, match = hits[0]
    return template_id, int(match.group(1)), int(match.group(2))


def test_schema():
    for rec in make_arithmetic_problems(50, seed=3):
        assert set(rec) == {"instruction", "input", "output", "answer"}
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["input"] == ""
        assert re.fullmatch(r"-?\d+", rec["answer"])
        assert rec["output"].endswith(f"The answer is {rec['answer']}")


def test_deterministic_per_seed():
    assert make_arithmetic_problems(40, seed=7) == make_arithmetic_problems(40, seed=7)
    assert make_arithmetic_problems(40, seed=7) != make_arithmetic_problems(40, seed=8)


def test_answers_are_correct_and_never_negative():
    problems = make_arithmetic_problems(N_DISTINCT, seed=0)
    for rec in problems:
        template_id, a, b = content(rec)
        op = _TEMPLATES[template_id][0]
        expected = a + b if op == "+" else a - b
        assert expected >= 0
        assert 1 <= a <= 9 and 1 <= b <= 9
        assert rec["answer"] == str(expected)
        assert rec["output"] == f"{a} {op} {b} = {expected}. The answer is {expected}"
        # The last number of the output is the answer (what evaluation extracts).
        assert re.findall(r"\d+", rec["output"])[-1] == rec["answer"]
    ops = {_TEMPLATES[content(r)[0]][0] for r in problems}
    assert ops == {"+", "-"}


def test_contents_are_distinct_and_varied():
    problems = make_arithmetic_problems(N_DISTINCT, seed=1)
    contents = [content(r) for r in problems]
    assert len(set(contents)) == N_DISTINCT
    first = problems[:200]
    assert len({content(r)[0] for r in first}) == len(_TEMPLATES)
    assert len({r["instruction"].split()[0] for r in first}) > 5  # names and openings vary


def test_max_operand_and_bounds():
    problems = make_arithmetic_problems(20, seed=0, max_operand=3)
    assert all(max(content(r)[1:]) <= 3 for r in problems)
    with pytest.raises(InputError, match="n must be between 0 and 1008"):
        make_arithmetic_problems(N_DISTINCT + 1)
    with pytest.raises(InputError, match="max_operand"):
        make_arithmetic_problems(1, max_operand=0)


def test_write_demo_data_disjoint(tmp_path):
    train_path, test_path = write_demo_data(str(tmp_path / "demo"), n_train=300, n_test=60, seed=5)
    with open(train_path) as f:
        train = json.load(f)
    with open(test_path) as f:
        test = json.load(f)
    assert (len(train), len(test)) == (300, 60)
    assert not {content(r) for r in train} & {content(r) for r in test}
    # The files load with the package's own loader.
    assert len(load_records(train_path)) == 300
    assert len(load_records(test_path, required=("instruction", "answer"))) == 60
    assert write_demo_data(str(tmp_path / "again"), n_train=300, n_test=60, seed=5)
    with open(tmp_path / "again" / "test.json") as f:
        assert json.load(f) == test
