"""Answer extraction and the catalogue of evaluation datasets.

A model's response is free text; evaluation needs the answer it commits to. Three answer kinds cover the
LLM-Adapters benchmarks:

- ``"number"`` (AddSub, MultiArith, SingleEq, gsm8k, SVAMP, mawps): the *last* number in the response, compared
  to the gold value with a tolerance (gold answers are strings such as ``"576.0"``);
- ``"letter"`` (AQuA): the *last* standalone option letter A–E. Taking the first capital letter, as LLM-Adapters
  did, picks up option lists and sentence-initial articles: on the AQuA rationales it agrees with the gold letter
  in 205 of 254 cases, the last-letter rule in 253;
- ``"choice"`` (boolq, piqa, social_i_qa, winogrande, hellaswag, ARC, openbookqa): the *first* label (``answer2``,
  ``true``, ...) named in the response, compared case-insensitively.

Only the standard library is used here, so the extraction rules can be tested and reused without torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peft_bayes.errors import InputError

__all__ = [
    "TASKS",
    "TaskSpec",
    "extract_answer",
    "extract_choice",
    "extract_number",
    "extract_option_letter",
    "get_task",
    "infer_task",
    "is_correct",
    "numbers_match",
]

# --------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------

# An unsigned decimal: "1,234,567" (commas only as thousands separators, in groups of three), "1234", "3.5", ".5".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A minus sign counts only where it cannot be a subtraction: not right after a digit, letter or closing bracket
# ("10-3" is 10 and 3, "x = -3" is -3).
_SIGN = r"(?:(?<![\w)\]])-)?"
_NUMBER_RE = re.compile(
    rf"(?<![\d.])(?P<num>{_SIGN}(?:{_UNSIGNED}))(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?",
)


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def extract_number(text: str) -> float | None:
    """Returns the last number in ``text``.

    Thousands separators are dropped (``"1,234.5"`` -> 1234.5), a leading minus sign is kept where it cannot be a
    subtraction (``"x = -3"`` -> -3.0, ``"10-3"`` -> 3.0), a sentence-final period is not a decimal point
    (``"is 42."`` -> 42.0), and a simple fraction is divided out (``"3/4"`` -> 0.75).

    Args:
        text: The model's response (or any string).

    Returns:
        The value as a float, or ``None`` when the text holds no number.
    """
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    value = _to_float(last.group("num"))
    den = last.group("den")
    if den is not None:
        den_value = float(den)
        # "3/0" is no fraction; the denominator is then the last number written.
        return value / den_value if den_value != 0 else den_value
    return value


def _parse_gold_number(gold: str | float) -> float:
    """Parses a gold answer that must be a number and nothing else ("576.0", "-3", "1,000", "3/4")."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return float(gold)
    text = str(gold).strip()
    # Strict: "12 apples", "answer4", "inf" are not numeric gold answers.
    if _NUMBER_RE.fullmatch(text) is None or (value := extract_number(text)) is None:
        raise InputError(f"gold answer {gold!r} is not a number")
    return value


def numbers_match(pred: float | None, gold: str | float, rel_tol: float = 1e-4, abs_tol: float = 1e-3) -> bool:
    """Whether a predicted number equals the gold answer within tolerance.

    Args:
        pred: The extracted prediction; ``None`` (nothing extracted) never matches.
        gold: The gold answer, as a number or a string such as ``"576.0"`` or ``"1,000"``.
        rel_tol: Relative tolerance, as in ``math.isclose``.
        abs_tol: Absolute tolerance, as in ``math.isclose``; the default accepts rounding to three decimals.

    Raises:
        InputError: ``gold`` is not a number.
    """
    gold_value = _parse_gold_number(gold)
    if pred is None or math.isnan(pred):
        return False
    return math.isclose(pred, gold_value, rel_tol=rel_tol, abs_tol=abs_tol)


def _format_number(value: float) -> str:
    if value.is_integer():
        return str(int(value))
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# Option letters
# --------------------------------------------------------------------------------------------------------------

# Phrases that announce an option letter; after them the letter may be lowercase or an "A" followed by a word.
_CUE = (
    r"(?:\b(?:answer|choice|option)s?\s*(?:is|was|would\s+be|should\s+be|will\s+be|:|=)\s*(?:option\s+|choice\s+)?"
    r"|\b(?:option|choice)\s+)\(?"
)


def extract_option_letter(text: str, letters: str = "ABCDE") -> str | None:
    """Returns the last standalone option letter in ``text``.

    A letter counts when it stands alone as a word and is uppercase (``"C"``, ``"C)"``, ``"C."``), is in
    parentheses (``"(c)"``), or follows a cue such as ``"answer is"`` / ``"option"``. An uppercase ``"A"`` followed
    by a word or a number (``"A train leaves"``, ``"A 10% discount"``) or opening a line as ``"A:"`` (the
    question-answer marker) is read as text, not as an option, unless a cue precedes it.

    Args:
        text: The model's response.
        letters: The option letters, uppercase.

    Returns:
        The letter, uppercase, or ``None`` when there is none.
    """
    if not letters:
        return None
    cls = "[" + re.escape(letters.upper()) + "]"
    end = r"(?![A-Za-z0-9_])"
    pattern = re.compile(
        rf"(?i:{_CUE})(?P<cued>(?i:{cls})){end}"  # "answer is (c)", "option B"
        rf"|\((?P<paren>(?i:{cls}))\)"  # "(c)"
        rf"|(?<![A-Za-z0-9_])(?P<bare>{cls}){end}"  # "C", "C)", "C."
    )
    found = None
    for m in pattern.finditer(text):
        if m.group("cued") is not None:
            # "the answer is a bit tricky": a lowercase article after a cue is still text.
            if not (m.group("cued") == "a" and _article_follows(text, m.end("cued"))):
                found = m.group("cued").upper()
        elif m.group("paren") is not None:
            found = m.group("paren").upper()
        elif not _reads_as_text(text, m.start("bare"), m.end("bare")):
            found = m.group("bare")
    return found


def _article_follows(text: str, end: int) -> bool:
    # "A train", "A 10% discount", "A $5 bill": the letter is followed by a word or a number.
    return re.match(r"[ \t]+[\w$%]", text[end:]) is not None


def _reads_as_text(text: str, start: int, end: int) -> bool:
    """Whether the bare uppercase letter at ``text[start:end]`` is the article "A" or a line-opening "A:"."""
    if text[start] != "A":
        return False
    if _article_follows(text, end):
        return True
    opens_line = text[:start].rstrip(" \t").endswith("\n") or not text[:start].strip()
    return opens_line and text[end:].startswith(":")


# --------------------------------------------------------------------------------------------------------------
# Choice labels
# --------------------------------------------------------------------------------------------------------------


def extract_choice(text: str, labels: Sequence[str]) -> str | None:
    """Returns the first label from ``labels`` named in ``text``.

    Labels match case-insensitively and as whole words, so ``"answer4"`` is not found inside ``"answer40"`` and
    ``"true"`` not inside ``"untrue"``. The *first* occurrence wins: the prompt asks the model to answer with the
    label ("the correct answer is answer2"), so the label it commits to comes first, while what it generates after
    the answer (restating the options, a next question) may name any other label.

    Args:
        text: The model's response.
        labels: The admissible labels, e.g. ``("answer1", "answer2", "answer3", "answer4")``.

    Returns:
        The label as spelled in ``labels``, or ``None`` when no label occurs.
    """
    by_lower = {label.lower(): label for label in labels if label}
    if not by_lower:
        return None
    # Longest first, so that a label that is a prefix of another cannot shadow it within the alternation.
    alternation = "|".join(re.escape(label) for label in sorted(by_lower, key=len, reverse=True))
    m = re.search(rf"(?<![A-Za-z0-9_])(?:{alternation})(?![A-Za-z0-9_])", text, flags=re.IGNORECASE)
    return None if m is None else by_lower[m.group(0).lower()]


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------

_KINDS = ("number", "letter", "choice")
_GROUPS = ("math", "commonsense")
OPTION_LETTERS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class TaskSpec:
    """How answers of one evaluation dataset are extracted and scored.

    Args:
        name: Dataset name, as the folder under LLM-Adapters' ``dataset/``.
        kind: ``"number"``, ``"letter"`` (multiple choice with option letters) or ``"choice"`` (named labels).
        labels: The option letters for ``"letter"``, the labels for ``"choice"``, empty for ``"number"``.
        group: ``"math"`` or ``"commonsense"``, the benchmark family the dataset is reported in.
    """

    name: str
    kind: str
    labels: tuple[str, ...] = ()
    group: str = "math"

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise InputError(f"task {self.name!r}: kind must be one of {'/'.join(_KINDS)}, got {self.kind!r}")
        if self.group not in _GROUPS:
            raise InputError(f"task {self.name!r}: group must be one of {'/'.join(_GROUPS)}, got {self.group!r}")
        if self.kind != "number" and not self.labels:
            raise InputError(f"task {self.name!r}: a {self.kind!r} task needs labels")


def _numbered(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


def _catalogue() -> dict[str, TaskSpec]:
    tasks = [TaskSpec(n, "number") for n in ("AddSub", "MultiArith", "SingleEq", "gsm8k", "SVAMP", "mawps")]
    tasks.append(TaskSpec("AQuA", "letter", OPTION_LETTERS))
    choice = {
        "boolq": ("true", "false"),
        "piqa": _numbered("solution", 2),
        "social_i_qa": _numbered("answer", 3),
        "winogrande": _numbered("option", 2),
        "hellaswag": _numbered("ending", 4),
        "ARC-Easy": _numbered("answer", 5),
        "ARC-Challenge": _numbered("answer", 5),
        "openbookqa": _numbered("answer", 4),
    }
    tasks += [TaskSpec(name, "choice", labels, "commonsense") for name, labels in choice.items()]
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _catalogue()


def get_task(name: str) -> TaskSpec:
    """Returns the spec of a known dataset; the name is matched exactly, then case-insensitively.

    Raises:
        InputError: the name is not in ``TASKS``.
    """
    if name in TASKS:
        return TASKS[name]
    folded = {key.lower(): spec for key, spec in TASKS.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(TASKS)}")


# "Answer format: answer1/answer2/answer3" closing the instruction; labels are single words without spaces.
_FORMAT_RE = re.compile(r"Answer format:\s*(?P<labels>[^\s/]+(?:\s*/\s*[^\s/]+)*)\s*$")


def _format_labels(instruction: str) -> tuple[str, ...] | None:
    m = _FORMAT_RE.search(instruction.strip())
    if m is None:
        return None
    labels = tuple(part.strip() for part in m.group("labels").split("/") if part.strip())
    return labels or None


def infer_task(records: Iterable[Mapping[str, str]], name: str = "custom") -> TaskSpec:
    """Infers how to score a dataset that is not in ``TASKS`` (e.g. a file given with ``--data_path``).

    - If the first record's instruction ends with ``"Answer format: x/y/z"``, the task is a ``"choice"`` task over
      the labels named there (the union over all records that state a format, in order of appearance, since e.g.
      ARC questions have four or five options);
    - else, if every answer is a single letter A–E, a ``"letter"`` task;
    - else, if every answer parses as a number, a ``"number"`` task.

    Args:
        records: Records with ``instruction`` and ``answer`` fields (as from ``load_records``).
        name: Name for the spec.

    Raises:
        InputError: there are no records, a record lacks ``answer``, or the answers fit none of the kinds.
    """
    records = list(records)
    if not records:
        raise InputError(f"dataset {name!r}: no records to infer the answer format from")
    if _format_labels(str(records[0].get("instruction", ""))) is not None:
        labels: dict[str, None] = {}
        for rec in records:
            for label in _format_labels(str(rec.get("instruction", ""))) or ():
                labels.setdefault(label, None)
        return TaskSpec(name, "choice", tuple(labels), "commonsense")
    answers = []
    for i, rec in enumerate(records):
        if rec.get("answer") is None:
            raise InputError(f"dataset {name!r}: record {i} lacks the field answer")
        answers.append(str(rec["answer"]).strip())
    if all(a in OPTION_LETTERS for a in answers):
        return TaskSpec(name, "letter", OPTION_LETTERS, "math")
    for i, a in enumerate(answers):
        try:
            _parse_gold_number(a)
        except InputError:
            raise InputError(
                f"dataset {name!r}: cannot tell how to score it: record {i} has answer {a[:40]!r}, which is "
                "neither a number nor a letter A-E, and the instruction states no 'Answer format: x/y/...'"
            ) from None
    return TaskSpec(name, "number", (), "math")


def extract_answer(text: str, task: TaskSpec) -> str | None:
    """Extracts the answer of ``task``'s kind from a response.

    Returns:
        A normalized string: a number as ``"7"`` or ``"0.75"``, an uppercase letter, or a label as spelled in
        ``task.labels``; ``None`` when the response holds no answer.
    """
    if task.kind == "number":
        value = extract_number(text)
        return None if value is None else _format_number(value)
    if task.kind == "letter":
        return extract_option_letter(text, "".join(task.labels))
    return extract_choice(text, task.labels)


def is_correct(pred: str | None, gold: str, task: TaskSpec) -> bool:
    """Whether an extracted answer equals the gold one: numbers within tolerance, letters and labels exactly up
    to case and surrounding spaces."""
    if pred is None:
        return False
    if task.kind == "number":
        try:
            value = _parse_gold_number(pred)
        except InputError:
            return False
        return numbers_match(value, gold)
    return pred.strip().lower() == str(gold).strip().lower()
