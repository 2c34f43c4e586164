"""Evaluation data sets: a test file's records made ready to score, with prompts and, for multiple choice, the options,
gold indices and the (context, continuation) pairs each option is scored on, in the label, cloze or letter format."""

from __future__ import annotations

from dataclasses import dataclass

from peft_bayes.data import load_records
from peft_bayes.data.answers import TASKS, TaskSpec, infer_task
from peft_bayes.data.choices import letter_instruction, parse_choice_question
from peft_bayes.evaluation import choice_scoring
from peft_bayes.evaluation.choice_scoring import DEFAULT_PREFIX, example_options, gold_indices


@dataclass
class EvalSet:
    """One test set ready to evaluate: records, prompts, and for multiple choice the options and gold indices."""

    name: str
    path: str
    records: list[dict]
    task: TaskSpec
    prompts: list[str]
    options: list[tuple[str, ...]] | None = None
    golds: list[int] | None = None
    pairs: list[list[tuple[str, str]]] | None = None  # per example, (context, scored continuation) per option
    texts: list[tuple[str, ...]] | None = None  # cloze: each option's text


def load_eval_set(name: str, path: str, limit: int | None, prompter, choice_format="label", prefix=DEFAULT_PREFIX):
    """Loads the first ``limit`` records, infers how to score them and checks every gold answer is an option.

    Multiple choice in the ``cloze`` format: each record's question and option texts are parsed out of its
    instruction, the prompt asks the question alone, and each option's text is the scored response.
    """

    records = load_records(path, required=("instruction", "answer"), split="test")[:limit]
    task = TASKS[name] if name in TASKS else infer_task(records, name)
    if task.kind == "choice" and choice_format in ("cloze", "letter"):
        return _parsed_eval_set(name, path, records, task, prompter, choice_format)
    prompts = [prompter.generate_prompt(r["instruction"], r.get("input")) for r in records]
    data = EvalSet(name, path, records, task, prompts)
    if task.kind == "choice":
        data.options = [example_options(r, task) for r in records]
        data.golds = gold_indices(records, data.options, path)
        data.pairs = [choice_scoring.label_pairs(p, opts, prefix) for p, opts in zip(prompts, data.options)]
    return data


def _parsed_eval_set(name: str, path: str, records: list[dict], task: TaskSpec, prompter, fmt: str) -> EvalSet:
    """The cloze and letter formats: the question and its options parsed out of each instruction."""

    where = [f"{path}: record {i}" for i in range(len(records))]
    questions = [parse_choice_question(r, w) for r, w in zip(records, where)]
    if fmt == "letter":  # the lettered question; each option is scored by its letter's token at "Answer:"
        texts = [letter_instruction(q, w) for q, w in zip(questions, where)]
    else:
        texts = [q.stem for q in questions]
    prompts = [prompter.generate_prompt(t, r.get("input")) for t, r in zip(texts, records)]
    data = EvalSet(name, path, records, task, prompts, options=[q.labels for q in questions])
    data.golds = gold_indices(records, data.options, path)
    if fmt == "letter":
        data.pairs = [choice_scoring.letter_pairs(p, len(q.texts), w) for p, q, w in zip(prompts, questions, where)]
    else:
        data.pairs = [choice_scoring.cloze_pairs(p, q) for p, q in zip(prompts, questions)]
    data.texts = [q.texts for q in questions]
    return data
