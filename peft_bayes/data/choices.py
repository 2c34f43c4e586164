"""Multiple-choice questions in LLM-Adapters' commonsense format, and the two ways of scoring them.

An LLM-Adapters instruction states the question, its options and the label format::

    Please choose the correct answer to the question: Which factor ...?

    Answer1: a leg muscle relaxing Answer2: a bacterial population ... Answer4: carbohydrates being digested

    Answer format: answer1/answer2/answer3/answer4

The gold answer is a label (``answer2``). Three formats score it:

- ``label``: the response names the label (``the correct answer is answer2``), LLM-Adapters' own format. A
  135M model cannot map a label to the option's content: on ARC-Easy SmolLM2-135M scores at chance this way.
- ``cloze``: each option's *text* is scored as the response to the question alone (lm-evaluation-harness' way of
  scoring small models). Options are parsed out of the instruction (``Answer1:``, ``Solution1:``, ``Option1:``,
  ``Ending1:``); boolq's ``true`` / ``false`` are scored as they are. Winogrande (a sentence with a ``_`` blank) is
  scored partially: the sentence up to the blank, filled with each option, is context, and the rest of the sentence
  is the scored continuation, the same tokens for every option.

Only the standard library is used here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from peft_bayes.data.answers import _format_labels
from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum

__all__ = [
    "CHOICE_FORMATS",
    "ChoiceFormat",
    "ChoiceQuestion",
    "LETTER_PREFIX",
    "cloze_training_record",
    "example_options",
    "gold_index",
    "letter_instruction",
    "letter_labels",
    "parse_choice_question",
]


class ChoiceFormat(OptionEnum):
    """How a multiple-choice record is put to the model: its ``label`` after a prefix (LLM-Adapters), each option's
    text as a ``cloze`` continuation of the question, or the lettered question's ``letter`` tokens (BLoB)."""

    LABEL = "label"
    CLOZE = "cloze"
    LETTER = "letter"


CHOICE_FORMATS = ChoiceFormat.values()
LETTERS = "ABCDEFGHIJ"
# The letter format's response before the scored letter: the context ends in "Answer:", the letter is " A".
LETTER_PREFIX = "Answer: "
# Option markers LLM-Adapters writes before each option's text: "Answer1:", "Solution1:", "Option1:", "Ending1:".
_MARKERS = ("answer", "solution", "option", "ending")
_FORMAT_LINE_RE = re.compile(r"\s*Answer format:[^\n]*\s*$")


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question, parsed.

    Args:
        stem: The instruction without the options and the ``Answer format:`` line: what the model is asked.
        labels: The option labels of the format line, in order (``answer1``, ..., or ``true`` / ``false``).
        texts: Each option's text (boolq: the labels themselves).
        blank: For fill-in-the-blank questions (winogrande): ``(sentence before the blank, sentence after it)``.
    """

    stem: str
    labels: tuple[str, ...]
    texts: tuple[str, ...]
    blank: tuple[str, str] | None = None

    def response(self, index: int) -> str:
        """The full response that picks option ``index``: its text, or the sentence with the blank filled."""
        if self.blank is None:
            return self.texts[index]
        before, after = self.blank
        return before + self.texts[index] + after

    def cloze_pair(self, index: int) -> tuple[str, str]:
        """``(response context, scored continuation)`` of option ``index`` in the cloze format.

        The context goes after the prompt; only the continuation's tokens are scored. A plain question scores the
        whole option text; a blank question scores the rest of the sentence after the filled blank.
        """
        if self.blank is None:
            return "", self.texts[index]
        before, after = self.blank
        return before + self.texts[index], after


def example_options(record: dict, default: Sequence[str] = ()) -> tuple[str, ...]:
    """The labels of a record's own ``Answer format:`` line (ARC has 3-5 options), else ``default``."""
    return _format_labels(str(record.get("instruction", ""))) or tuple(default)


def gold_index(record: dict, labels: Sequence[str], where: str) -> int:
    """Index of the record's gold ``answer`` among ``labels`` (case-insensitive).

    Raises:
        InputError: the answer is not one of the labels; ``where`` names the record.
    """
    lowered = [label.strip().lower() for label in labels]
    gold = str(record.get("answer", "")).strip().lower()
    if gold not in lowered:
        raise InputError(
            f"{where} has answer {record.get('answer')!r}, which is not one of its options {'/'.join(labels)}"
        )
    return lowered.index(gold)


def _marker_of(labels: Sequence[str]) -> str | None:
    """The option marker word when the labels are ``<marker>1 .. <marker>N``, else None (boolq's true/false)."""
    for marker in _MARKERS:
        if [label.lower() for label in labels] == [f"{marker}{i}" for i in range(1, len(labels) + 1)]:
            return marker
    return None


def _split_options(body: str, marker: str, n: int, where: str) -> tuple[str, tuple[str, ...]]:
    """Stem and option texts of ``body``: the markers ``Marker1:`` .. ``MarkerN:`` are looked for in order."""
    starts = []
    pos = 0
    for i in range(1, n + 1):
        m = re.compile(rf"\b{marker}{i}\s*:", re.IGNORECASE).search(body, pos)
        if m is None:
            raise InputError(f"{where}: option {marker}{i} not found in the instruction")
        starts.append(m)
        pos = m.end()
    texts = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < n else len(body)
        text = " ".join(body[m.end() : end].split())
        if not text:
            raise InputError(f"{where}: option {marker}{i + 1} is empty")
        texts.append(text)
    stem = body[: starts[0].start()].strip()
    if not stem:
        raise InputError(f"{where}: no question before the options")
    return stem, tuple(texts)


def _blank(stem: str, where: str) -> tuple[str, str]:
    """(before, after) the ``_`` of a fill-in-the-blank sentence: the stem's text after its first ``": "``."""
    sentence = stem.split(": ", 1)[1] if ": " in stem else stem
    if sentence.count("_") != 1:
        raise InputError(f"{where}: a fill-in-the-blank question needs exactly one '_' in {sentence!r}")
    before, after = sentence.split("_")
    if not after.strip():
        raise InputError(f"{where}: nothing to score after the blank in {sentence!r}")
    return before, after


def parse_choice_question(record: dict, where: str = "record") -> ChoiceQuestion:
    """Parses an LLM-Adapters multiple-choice instruction into its stem, labels and option texts.

    Args:
        record: A record with an ``instruction`` that ends in ``Answer format: l1/l2/...``.
        where: Names the record in errors (``"data.json: record 12"``).

    Raises:
        InputError: no format line, or an option the format line names is missing or empty.
    """
    instruction = str(record.get("instruction", ""))
    labels = _format_labels(instruction)
    if labels is None:
        raise InputError(f"{where}: no 'Answer format: ...' line, so not a multiple-choice question")
    body = _FORMAT_LINE_RE.sub("", instruction.strip())
    marker = _marker_of(labels)
    if marker is None:  # boolq: the labels are the answers themselves
        stem = body.strip()
        if not stem:
            raise InputError(f"{where}: no question before the answer format")
        return ChoiceQuestion(stem, labels, labels)
    stem, texts = _split_options(body, marker, len(labels), where)
    blank = _blank(stem, where) if marker == "option" and "_" in stem else None
    return ChoiceQuestion(stem, labels, texts, blank)


def cloze_training_record(record: dict, where: str = "record") -> dict:
    """A multiple-choice training record in the cloze format: instruction = the question, output = the gold option's
    text (winogrande: the sentence with the blank filled). Other fields are kept.

    Raises:
        InputError: the question or its gold answer cannot be parsed.
    """
    question = parse_choice_question(record, where)
    gold = gold_index(record, question.labels, where)
    return {
        **record,
        "instruction": question.stem,
        "input": record.get("input", ""),
        "output": question.response(gold),
    }


def letter_labels(n: int, where: str = "record") -> tuple[str, ...]:
    """``("A", "B", ...)`` for ``n`` options.

    Raises:
        InputError: more options than letters.
    """
    if not 1 <= n <= len(LETTERS):
        raise InputError(f"{where}: the letter format handles 1 to {len(LETTERS)} options, not {n}")
    return tuple(LETTERS[:n])


def letter_instruction(question: ChoiceQuestion, where: str = "record") -> str:
    """The letter format's instruction: the question, then one ``X. option text`` line per option.

    Example: ``"Which gas do plants take in?\n\nChoices:\nA. oxygen\nB. carbon dioxide\n\nAnswer with the letter of
    the correct choice."``
    """
    letters = letter_labels(len(question.texts), where)
    lines = [f"{letter}. {text}" for letter, text in zip(letters, question.texts)]
    return f"{question.stem}\n\nChoices:\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct choice."
