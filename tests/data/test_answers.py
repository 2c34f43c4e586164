"""Unit tests of answer extraction and the task catalogue (no data files needed)."""

import dataclasses

import pytest

from peft_bayes.data.answers import (
    TASKS,
    TaskSpec,
    extract_answer,
    extract_choice,
    extract_number,
    extract_option_letter,
    get_task,
    infer_task,
    is_correct,
    numbers_match,
)
from peft_bayes.errors import InputError

# ---------------------------------------------------------------------------------------------------------------
# extract_number
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", 42.0),  # sentence-final period is not a decimal point
        ("The answer is 42", 42.0),
        ("He paid 1,234.5 dollars in total", 1234.5),
        ("$1,000,000 were raised", 1_000_000.0),
        ("It fell to -7 degrees", -7.0),
        ("x = -3.25", -3.25),
        ("10-3", 3.0),  # subtraction, not a negative number
        ("(-3)", -3.0),
        ("She ate 3/4 of the pie", 0.75),
        ("36 * 2/3 = 24 sq ft, so 24 * 24 = 576 tiles. The answer is 576.", 576.0),  # last number wins
        ("0.2 + 0.4 = 0.6", 0.6),
        ("about .5 liters", 0.5),
        ("The answer is 1,2,3", 3.0),  # commas not in groups of three separate numbers
        ("12,3456", 3456.0),
        ("pick answer4", 4.0),
        ("3/0", 0.0),  # no fraction with a zero denominator: the last number written
        ("10.5%", 10.5),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("text", ["", "no number here", "the answer is x", "-", "..."])
def test_extract_number_none(text):
    assert extract_number(text) is None


def test_extract_number_last_not_first():
    assert extract_number("First 1, then 22, finally 333 apples") == 333.0
    assert extract_number("333 apples, then 22, finally 1") == 1.0


# ---------------------------------------------------------------------------------------------------------------
# numbers_match
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (576.0, "576.0", True),
        (576, "576", True),
        (1000.0, "1,000", True),
        (0.3333, "0.3333333333333333", True),  # within abs_tol 1e-3
        (0.33, "0.3333333333333333", False),
        (1_000_001.0, "1000000.0", True),  # within rel_tol 1e-4
        (1_000_200.0, "1000000.0", False),
        (-15.0, "-15.0", True),
        (15.0, "-15.0", False),
        (None, "5", False),
        (5.0, 5, True),
        (float("nan"), "5", False),
    ],
)
def test_numbers_match(pred, gold, expected):
    assert numbers_match(pred, gold) is expected


def test_numbers_match_custom_tolerance():
    assert not numbers_match(10.4, "10")
    assert numbers_match(10.4, "10", rel_tol=0.05)
    assert numbers_match(10.4, "10", abs_tol=0.5)


@pytest.mark.parametrize("gold", ["seven", "7 apples", "answer7", "inf", "nan", ""])
def test_numbers_match_bad_gold(gold):
    with pytest.raises(InputError, match="is not a number"):
        numbers_match(7.0, gold)


def test_numbers_match_fraction_gold():
    assert numbers_match(0.75, "3/4") and numbers_match(0.75, " 3/4 ")


# ---------------------------------------------------------------------------------------------------------------
# extract_option_letter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("C", "C"),
        ("The answer is E", "E"),
        ("answer: d", "D"),  # lowercase after a cue
        ("I would pick option c.", "C"),
        ("(a) is wrong", "A"),
        # Several letters: the last one, not the first as in LLM-Adapters.
        ("Options (A) 60 m (B) 61 m (C) 62 m. The perimeter is 62 m. The answer is (C).", "C"),
        ("A is wrong and B is wrong, so D", "D"),
        # The article "A" is not an option, wherever it stands.
        ("The answer is (D). A quick check confirms it.", "D"),
        ("The answer is C\nA train would take longer.", "C"),
        ("It is (B), with A 10% discount", "B"),
        # ... unless a cue announces it.
        ("The answer is A because 5 > 3", "A"),
        ("The answer is A.", "A"),
        # Letters inside words, and letters outside the option set, do not count.
        ("CAB fare and a DECADE", None),
        ("Answer F", None),
        ("the answer is a bit tricky", None),
        ("To answer a question, read it.", None),
        ("A: There were 7 crayons", None),  # the question-answer marker
        ("no letters here", None),
        ("", None),
    ],
)
def test_extract_option_letter(text, expected):
    assert extract_option_letter(text) == expected


def test_extract_option_letter_custom_letters():
    assert extract_option_letter("The answer is (E).", letters="ABCD") is None
    assert extract_option_letter("B or D", letters="ABC") == "B"
    assert extract_option_letter("anything", letters="") is None


# ---------------------------------------------------------------------------------------------------------------
# extract_choice
# ---------------------------------------------------------------------------------------------------------------

ARC = ("answer1", "answer2", "answer3", "answer4", "answer5")


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("the correct answer is answer3", ARC, "answer3"),
        ("the correct answer is Answer3", ARC, "answer3"),  # different case
        ("ANSWER2", ARC, "answer2"),
        ("the correct answer is false", ("true", "false"), "false"),
        ("True", ("true", "false"), "true"),
        ("solution2.", ("solution1", "solution2"), "solution2"),
        ("the correct answer is option1", ("option1", "option2"), "option1"),
        ("ending4", ("ending1", "ending2", "ending3", "ending4"), "ending4"),
        # The first label wins: later text (restated options, a next question) names others.
        ("the correct answer is answer3\n\nAnswer1: blue Answer2: red Answer3: green Answer4: tan", ARC, "answer3"),
        ("true. It is false that the sky is green.", ("true", "false"), "true"),
        # Whole words only.
        ("answer40", ARC, None),
        ("the correct answer is answer40, i.e. answer4", ARC, "answer4"),
        ("myanswer1", ARC, None),
        ("untrue", ("true", "false"), None),
        ("answer_1", ARC, None),
        ("the correct answer is answer6", ARC, None),
        ("", ARC, None),
    ],
)
def test_extract_choice(text, labels, expected):
    assert extract_choice(text, labels) == expected


def test_extract_choice_returns_label_spelling():
    assert extract_choice("the answer is answer2", ("Answer1", "Answer2")) == "Answer2"


def test_extract_choice_prefix_labels():
    # "answer1" is a prefix of "answer10": the whole-word rule must still pick the right one.
    labels = tuple(f"answer{i}" for i in range(1, 11))
    assert extract_choice("answer10", labels) == "answer10"
    assert extract_choice("answer1", labels) == "answer1"
    assert extract_choice("text", ()) is None


# ---------------------------------------------------------------------------------------------------------------
# TaskSpec, TASKS, get_task
# ---------------------------------------------------------------------------------------------------------------

MATH = ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps"]
COMMONSENSE = ["boolq", "piqa", "social_i_qa", "winogrande", "hellaswag", "ARC-Easy", "ARC-Challenge", "openbookqa"]


def test_tasks_catalogue():
    assert set(TASKS) == set(MATH) | set(COMMONSENSE)
    assert all(TASKS[n].group == "math" for n in MATH)
    assert all(TASKS[n].group == "commonsense" and TASKS[n].kind == "choice" for n in COMMONSENSE)
    assert TASKS["AQuA"].kind == "letter" and TASKS["AQuA"].labels == ("A", "B", "C", "D", "E")
    assert TASKS["gsm8k"].kind == "number" and TASKS["gsm8k"].labels == ()
    assert TASKS["boolq"].labels == ("true", "false")
    assert TASKS["piqa"].labels == ("solution1", "solution2")
    assert TASKS["social_i_qa"].labels == ("answer1", "answer2", "answer3")
    assert TASKS["winogrande"].labels == ("option1", "option2")
    assert TASKS["hellaswag"].labels == ("ending1", "ending2", "ending3", "ending4")
    assert TASKS["ARC-Easy"].labels == TASKS["ARC-Challenge"].labels == ARC
    assert TASKS["openbookqa"].labels == ("answer1", "answer2", "answer3", "answer4")
    assert all(name == spec.name for name, spec in TASKS.items())


def test_taskspec_frozen_and_validated():
    spec = TASKS["gsm8k"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "letter"
    with pytest.raises(InputError, match="kind"):
        TaskSpec("x", "free-text")
    with pytest.raises(InputError, match="group"):
        TaskSpec("x", "number", group="vision")
    with pytest.raises(InputError, match="labels"):
        TaskSpec("x", "choice", ())


def test_get_task():
    assert get_task("gsm8k") is TASKS["gsm8k"]
    assert get_task("GSM8K") is TASKS["gsm8k"]
    assert get_task("arc-easy") is TASKS["ARC-Easy"]
    with pytest.raises(InputError) as err:
        get_task("gsm9k")
    message = str(err.value)
    assert "\n" not in message and "'gsm9k'" in message
    assert all(name in message for name in TASKS)


# ---------------------------------------------------------------------------------------------------------------
# infer_task
# ---------------------------------------------------------------------------------------------------------------


def _rec(answer, instruction="Solve it."):
    return {"instruction": instruction, "input": "", "output": "", "answer": answer}


def test_infer_task_choice():
    fmt = "Question?\n\nAnswer1: x Answer2: y Answer3: z\n\nAnswer format: answer1/answer2/answer3"
    fmt5 = "Question?\n\nAnswer format: answer1/answer2/answer3/answer4/answer5\n"  # trailing newline
    spec = infer_task([_rec("answer2", fmt), _rec("answer5", fmt5)], name="mine")
    assert spec == TaskSpec("mine", "choice", ARC, "commonsense")
    spec = infer_task([_rec("true", "Is it?\n\nAnswer format: true/false")])
    assert spec.kind == "choice" and spec.labels == ("true", "false") and spec.name == "custom"


def test_infer_task_letter_and_number():
    assert infer_task([_rec("A"), _rec("E"), _rec("C")]) == TaskSpec("custom", "letter", ("A", "B", "C", "D", "E"))
    assert infer_task([_rec("576.0"), _rec("-3"), _rec("1,000"), _rec("7")]).kind == "number"
    # "answer format" somewhere other than the end of the instruction does not make a choice task
    assert infer_task([_rec("5", "Answer format: a/b. Compute 2+3.")]).kind == "number"


def test_infer_task_errors():
    with pytest.raises(InputError, match="no records"):
        infer_task([])
    with pytest.raises(InputError, match=r"record 1 has answer 'blue'"):
        infer_task([_rec("5"), _rec("blue")], name="colors")
    with pytest.raises(InputError, match="record 0 lacks the field answer"):
        infer_task([{"instruction": "x"}])
    # labels without an "Answer format" line are not numbers, even though they end in digits
    with pytest.raises(InputError, match="'answer2'"):
        infer_task([_rec("answer2")])
    # letters and numbers mixed: neither kind
    with pytest.raises(InputError, match="'A'"):
        infer_task([_rec("5"), _rec("A")])


# ---------------------------------------------------------------------------------------------------------------
# extract_answer / is_correct
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, task, expected",
    [
        ("so 7 - 3 = 4 crayons. The answer is 4.", "AddSub", "4"),
        ("The answer is 576.0", "gsm8k", "576"),
        ("3/4 of it", "SVAMP", "0.75"),
        ("The answer is -15.", "mawps", "-15"),
        ("The answer is 1,234.5", "gsm8k", "1234.5"),
        ("nothing", "gsm8k", None),
        ("The answer is (C).", "AQuA", "C"),
        ("no option", "AQuA", None),
        ("the correct answer is Answer4", "openbookqa", "answer4"),
        ("the correct answer is answer5", "openbookqa", None),  # not an openbookqa label
        ("the correct answer is TRUE", "boolq", "true"),
    ],
)
def test_extract_answer(text, task, expected):
    assert extract_answer(text, TASKS[task]) == expected


@pytest.mark.parametrize(
    "pred, gold, task, expected",
    [
        ("576", "576.0", "gsm8k", True),
        ("0.3333333333333333", "0.3333333333333333", "AddSub", True),
        ("0.333", "0.3333333333333333", "AddSub", True),
        ("0.32", "0.3333333333333333", "AddSub", False),
        ("1,000", "1000.0", "SVAMP", True),
        ("12", "21.0", "SVAMP", False),
        ("twelve", "12", "SVAMP", False),
        (None, "12", "SVAMP", False),
        ("c", "C", "AQuA", True),
        ("B", "C", "AQuA", False),
        ("Answer3", "answer3", "ARC-Easy", True),
        ("answer3", "answer30", "ARC-Easy", False),
        ("true", "false", "boolq", False),
        (None, "true", "boolq", False),
    ],
)
def test_is_correct(pred, gold, task, expected):
    assert is_correct(pred, gold, TASKS[task]) is expected


def test_extract_then_score_round_trip():
    spec = TASKS["gsm8k"]
    assert is_correct(extract_answer("36 * 2/3 = 24. The answer is 576.", spec), "576.0", spec)
    assert not is_correct(extract_answer("The answer is 577.", spec), "576.0", spec)
