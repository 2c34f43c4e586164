"""Parsing LLM-Adapters' multiple-choice instructions for the cloze format: every option marker, boolq, the
winogrande blank, training records, and one-line errors that name the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_bayes.data.choices import ChoiceQuestion, cloze_training_record, gold_index, parse_choice_question
from peft_bayes.errors import InputError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "llm-adapters" / "dataset"

ARC = {
    "instruction": "Please choose the correct answer to the question: Which factor will most likely cause a fever?"
    "\n\nAnswer1: a leg muscle relaxing Answer2: a bacterial population in the bloodstream Answer3: viral particles "
    "on the skin Answer4: carbohydrates being digested\n\nAnswer format: answer1/answer2/answer3/answer4",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}
BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
    "Answer format: true/false",
    "answer": "true",
}
PIQA = {
    "instruction": "Please choose the correct solution to the question: To open a jar,\n\nSolution1: twist the lid."
    "\n\nSolution2: hit it with a hammer.\n\nAnswer format: solution1/solution2",
    "answer": "solution1",
}
WINOGRANDE = {
    "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was "
    "a much better surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah Option2: Maria Answer "
    "format: option1/option2",
    "answer": "option1",
}
HELLASWAG = {
    "instruction": "Please choose the correct ending to complete the given sentence: Baking: She mixes the flour."
    "\n\nEnding1: then bakes it. Ending2: then swims. Ending3: then flies. Ending4: then sings.\n\n"
    "Answer format: ending1/ending2/ending3/ending4",
    "answer": "ending1",
}


def test_answer_markers():
    q = parse_choice_question(ARC)
    assert q.stem == "Please choose the correct answer to the question: Which factor will most likely cause a fever?"
    assert q.labels == ("answer1", "answer2", "answer3", "answer4")
    assert q.texts == (
        "a leg muscle relaxing",
        "a bacterial population in the bloodstream",
        "viral particles on the skin",
        "carbohydrates being digested",
    )
    assert q.blank is None and q.cloze_pair(1) == ("", "a bacterial population in the bloodstream")


@pytest.mark.parametrize(
    ("record", "texts"),
    [
        (PIQA, ("twist the lid.", "hit it with a hammer.")),
        (HELLASWAG, ("then bakes it.", "then swims.", "then flies.", "then sings.")),
        (BOOLQ, ("true", "false")),
    ],
)
def test_other_markers_and_boolq(record, texts):
    q = parse_choice_question(record)
    assert q.texts == texts
    assert "Answer format" not in q.stem and q.stem.endswith(("jar,", "flour.", "blue?"))


def test_winogrande_blank_is_scored_after_the_filled_option():
    q = parse_choice_question(WINOGRANDE)
    assert q.texts == ("Sarah", "Maria")
    assert q.cloze_pair(1) == ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")
    assert q.response(0) == "Sarah was a much better surgeon than Maria so Sarah always got the harder cases."
    # the scored continuation is the same text for every option
    assert len({q.cloze_pair(k)[1] for k in range(2)}) == 1


def test_training_record_in_cloze_format():
    rec = cloze_training_record(ARC, "train.json: record 0")
    assert rec["instruction"] == parse_choice_question(ARC).stem
    assert rec["output"] == "a bacterial population in the bloodstream"
    assert rec["answer"] == "answer2"  # other fields are kept
    assert cloze_training_record(BOOLQ)["output"] == "true"
    assert cloze_training_record(WINOGRANDE)["output"].endswith("so Sarah always got the harder cases.")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "What is 2 + 2?", "answer": "4"}, "no 'Answer format"),
        ({**ARC, "instruction": ARC["instruction"].replace("Answer3:", "Answer 3")}, "option answer3 not found"),
        ({**ARC, "instruction": ARC["instruction"].replace("Answer1: a leg muscle relaxing", "Answer1:")}, "empty"),
        ({**WINOGRANDE, "instruction": WINOGRANDE["instruction"].replace(" _ ", " _ _ ")}, "exactly one '_'"),
    ],
)
def test_unparseable_questions_name_the_record(record, message):
    with pytest.raises(InputError, match=message) as err:
        parse_choice_question(record, "data.json: record 7")
    assert str(err.value).startswith("data.json: record 7") and "\n" not in str(err.value)


def test_unknown_gold_answer_names_the_record():
    with pytest.raises(InputError, match="record 3 has answer 'answer9'"):
        cloze_training_record({**ARC, "answer": "answer9"}, "train.json: record 3")
    assert gold_index({"answer": " Answer2 "}, ("answer1", "answer2"), "x") == 1


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA} (CI has it under ../shared)")
@pytest.mark.parametrize("name", ["ARC-Easy", "ARC-Challenge", "openbookqa", "boolq"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_real_record_parses(name, split):
    records = json.loads((DATA / name / f"{split}.json").read_text())
    for i, rec in enumerate(records):
        q = parse_choice_question(rec, f"{name}/{split}.json: record {i}")
        assert isinstance(q, ChoiceQuestion) and len(q.texts) == len(q.labels) >= 2
        assert all(t and "Answer format" not in t for t in q.texts)
        assert 0 <= gold_index(rec, q.labels, f"record {i}") < len(q.labels)
