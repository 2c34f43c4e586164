"""Loading and answer extraction on the real LLM-Adapters data, where ``../shared/data/llm-adapters`` exists.

The agreement thresholds below sit slightly under the values measured on this data (stated in comments). Two
quantities are measured for the math sets, because the ``output`` fields are *model-written* rationales, often
wrong:

- agreement of the extraction from ``output`` with the gold ``answer``: mostly the accuracy of the model that
  wrote the rationales, so it only guards against an extractor that loses answers the model got right;
- agreement with the answer the rationale itself states ("The answer is 15."): this one measures the extractor.
"""

import csv
import json
import re
from functools import cache
from pathlib import Path

import pytest

from peft_bayes.data.answers import (
    TASKS,
    extract_choice,
    extract_number,
    extract_option_letter,
    infer_task,
    numbers_match,
)
from peft_bayes.data.loading import load_records
from peft_bayes.errors import InputError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm-adapters"
SCHEMA = {"instruction", "input", "output", "answer"}

pytestmark = pytest.mark.skipif(
    not (DATA / "MANIFEST.tsv").is_file(), reason=f"real data absent: {DATA} (CI has it at ../shared/data)"
)


def _manifest() -> list[dict[str, str]]:
    if not (DATA / "MANIFEST.tsv").is_file():
        return []
    with open(DATA / "MANIFEST.tsv", encoding="utf-8", newline="") as f:
        return [row for row in csv.DictReader(f, delimiter="\t") if row["path"].endswith(".json")]


MANIFEST = _manifest()
IN_SCHEMA = [row for row in MANIFEST if set(row["fields"].split(",")) == SCHEMA]
OTHER_SCHEMA = [row for row in MANIFEST if set(row["fields"].split(",")) != SCHEMA]


@cache
def _records(name: str) -> list[dict[str, str]]:
    return load_records(str(DATA / "dataset" / name / "test.json"), required=("instruction", "answer"))


def test_manifest_read():
    # Guards the parametrizations below against silently running on nothing.
    assert len(IN_SCHEMA) >= 20 and len(OTHER_SCHEMA) >= 10
    assert any(row["path"] == "dataset/mawps/trainset.json" for row in OTHER_SCHEMA)


@pytest.mark.parametrize("row", IN_SCHEMA, ids=lambda row: row["path"])
def test_schema_files_load(row):
    records = load_records(str(DATA / row["path"]), required=("instruction", "answer"))
    assert len(records) == int(row["records"])
    assert all(isinstance(r["instruction"], str) and isinstance(r["answer"], str) for r in records)


@pytest.mark.parametrize("row", OTHER_SCHEMA, ids=lambda row: row["path"])
def test_other_schema_files_rejected(row):
    fields = set(row["fields"].split(","))
    missing = [f for f in ("instruction", "answer") if f not in fields]
    assert missing, "a file outside the schema still has both required fields; the test premise is wrong"
    with pytest.raises(InputError) as err:
        load_records(str(DATA / row["path"]), required=("instruction", "answer"))
    message = str(err.value)
    assert row["path"] in message.replace("\\", "/") and "\n" not in message
    assert all(field in message for field in missing)


def test_tasks_cover_dataset_folders():
    folders = {p.name for p in (DATA / "dataset").iterdir() if p.is_dir()}
    assert folders and folders <= set(TASKS), sorted(folders - set(TASKS))


# ---------------------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------------------

# name -> (minimum fraction of `output` whose last number equals the gold answer, measured value in the comment)
MATH_GOLD_AGREEMENT = {
    "AddSub": 0.93,  # measured 371/395 = 0.939
    "MultiArith": 0.92,  # measured 560/600 = 0.933
    "SingleEq": 0.945,  # measured 484/508 = 0.953
    "gsm8k": 0.575,  # measured 771/1319 = 0.585
    "SVAMP": 0.795,  # measured 804/1000 = 0.804
}
# name -> minimum fraction of rationales stating "The answer is N" whose last number is N
MATH_STATED_AGREEMENT = {
    "AddSub": 1.0,  # measured 395/395
    "MultiArith": 0.995,  # measured 599/600 ("The answer is 49 - 34 = 15 customers.")
    "SingleEq": 1.0,  # measured 508/508
    "gsm8k": 0.98,  # measured 1279/1296 = 0.987 (misses: "4 blue and 3 red", "$118 000", "3:00 pm")
    "SVAMP": 0.985,  # measured 987/999 = 0.988 (misses: "13 crackers and 15 cakes")
}
_STATED_NUMBER = re.compile(r"[Tt]he answer is\s*\$?(-?[\d,]*\.?\d+)")


@pytest.mark.parametrize("name", ["AddSub", "MultiArith", "SingleEq", "gsm8k", "SVAMP", "mawps"])
def test_math_gold_answers_parse(name):
    records = _records(name)
    assert all(extract_number(r["answer"]) is not None for r in records)
    assert all(numbers_match(extract_number(r["answer"]), r["answer"]) for r in records)
    assert infer_task(records, name).kind == TASKS[name].kind == "number"


@pytest.mark.parametrize("name", sorted(MATH_GOLD_AGREEMENT))
def test_math_extraction_agrees_with_gold(name):
    records = _records(name)
    agree = sum(numbers_match(extract_number(r["output"]), r["answer"]) for r in records)
    assert agree / len(records) >= MATH_GOLD_AGREEMENT[name], f"{name}: {agree}/{len(records)}"


@pytest.mark.parametrize("name", sorted(MATH_STATED_AGREEMENT))
def test_math_extraction_agrees_with_stated_answer(name):
    stated = [(r["output"], m[-1]) for r in _records(name) if (m := _STATED_NUMBER.findall(r["output"]))]
    assert len(stated) >= 0.98 * len(_records(name))
    agree = sum(numbers_match(extract_number(text), answer) for text, answer in stated)
    assert agree / len(stated) >= MATH_STATED_AGREEMENT[name], f"{name}: {agree}/{len(stated)}"


def test_mawps_has_no_rationales():
    # mawps/test.json carries no rationale (`output` is empty), so there is nothing to extract from; if that
    # changes, add mawps to the agreement tables above.
    assert all(r["output"] == "" for r in _records("mawps"))


def test_aqua_gold_letters():
    records = _records("AQuA")
    assert {r["answer"] for r in records} == set(TASKS["AQuA"].labels)
    assert infer_task(records, "AQuA") == TASKS["AQuA"]


def test_aqua_last_letter_on_rationales():
    records = _records("AQuA")
    letters = [extract_option_letter(r["output"]) for r in records]
    stated = [(m[-1] if (m := re.findall(r"answer is \(([A-E])\)", r["output"])) else None) for r in records]
    # The rationale's own conclusion "The answer is (X)": measured 252 of the 252 that state one; the two
    # rationales that stop before concluding give None. The first-capital rule of LLM-Adapters gets 205 of 254.
    assert sum(s is not None for s in stated) >= 250
    assert letters == stated
    first_capital = [(re.findall(r"[A-E]", r["output"]) or [None])[0] for r in records]
    assert sum(f == s for f, s in zip(first_capital, stated)) < 220
    # Against the gold letter: measured 123 of 254 (the rationales are a model's, often wrong).
    assert sum(letter == r["answer"] for letter, r in zip(letters, records)) >= 120


def test_aqua_last_letter_matches_rationale_conclusions_in_aqua_1():
    # aqua_1.json pairs each chain of thought with the letter it concluded (`pred`). The shared data README's
    # "last option letter agrees in 253 of 254" is this comparison (measured 253; first capital letter: 206).
    # Against the gold `answer` the same rationales score 123 of 254: they are a model's, often wrong.
    with open(DATA / "dataset" / "AQuA" / "aqua_1.json", encoding="utf-8") as f:
        rows = json.load(f)
    assert len(rows) == 254
    last = [extract_option_letter(r["chain-of-thought"]) for r in rows]
    assert sum(x == r["pred"] for x, r in zip(last, rows)) >= 250
    first_capital = [(re.findall(r"[A-E]", r["chain-of-thought"]) or [None])[0] for r in rows]
    assert sum(x == r["pred"] for x, r in zip(first_capital, rows)) < 220


def test_aqua_last_letter_on_gold_rationales():
    # AQuA.json holds the human-written rationales; align them with test.json by question text.
    def key(question: str) -> str:
        return " ".join(question.split("Answer Choices")[0].split())[:120]

    gold = {key(r["instruction"]): r["answer"] for r in _records("AQuA")}
    with open(DATA / "dataset" / "AQuA" / "AQuA.json", encoding="utf-8") as f:
        originals = json.load(f)
    pairs = [(extract_option_letter(o["rationale"]), gold[key(o["sQuestion"])]) for o in originals]
    assert len(pairs) == 254
    # Measured 243 of 254; the 11 misses are rationales that name no option letter at all (extraction gives None),
    # so the rule never picks a wrong letter here.
    assert sum(p == g for p, g in pairs) >= 240
    assert all(p is None for p, g in pairs if p != g)


# ---------------------------------------------------------------------------------------------------------------
# Commonsense
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"])
def test_commonsense_labels(name):
    records = _records(name)
    spec = infer_task(records, name)
    assert spec.kind == "choice" and spec.group == "commonsense"
    assert spec.labels == TASKS[name].labels
    assert all(r["answer"] in spec.labels for r in records)
    assert all(extract_choice(r["answer"], spec.labels) == r["answer"] for r in records)
    # `output` is "the correct answer is <label>" built from the gold answer.
    assert all(extract_choice(r["output"], spec.labels) == r["answer"] for r in records)
