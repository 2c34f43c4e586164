"""Loading instruction data in the LLM-Adapters schema and turning it into token ids.

A record is ``{"instruction": str, "input": str, "output": str, "answer": str}``: ``output`` is the training
target (often a rationale), ``answer`` the gold label used at evaluation time. ``input`` may be empty; ``answer``
is optional for training data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from peft_bayes.data.answers import infer_task
from peft_bayes.data.choices import (
    LETTER_PREFIX,
    cloze_training_record,
    gold_index,
    letter_instruction,
    letter_labels,
    parse_choice_question,
)
from peft_bayes.errors import InputError

TRAIN_FIELDS = ("instruction", "output")
EVAL_FIELDS = ("instruction", "answer")


def _read_json_records(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                rows = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise InputError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
                return rows
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):  # {"data": [...]} wrappers
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _load_hub(name: str, split: str) -> list[Any]:
    # Imported here: `datasets` is slow to import and only needed for Hub names.
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; the message is what matters to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"dataset {name!r} is neither a local data file nor a loadable dataset: {first}") from None
    return [dict(r) for r in ds]


def _as_text(value) -> str:
    # JSON true/false become "true"/"false" (boolq's labels), not Python's "True"/"False".
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _looks_like_path(source: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else with a file suffix or a path prefix is a local path.
    return source.endswith((".json", ".jsonl")) or source.startswith(("/", ".", "~")) or source.count("/") > 1


def load_records(source: str, required: Sequence[str] = TRAIN_FIELDS, split: str = "train") -> list[dict[str, str]]:
    """Loads and validates a list of records.

    Args:
        source: A local ``.json`` / ``.jsonl`` file, a directory holding ``<split>.json`` (LLM-Adapters' layout),
            any other directory ``datasets.load_dataset`` reads (parquet / csv / json shards), or a Hugging Face
            Hub dataset name.
        required: Fields every record must have as strings (``instruction`` and ``output`` for training,
            ``instruction`` and ``answer`` for evaluation).
        split: Split to take from a Hub dataset, and the file preferred in a directory (``<split>.json``).

    Returns:
        The records as dicts with string values; ``input`` defaults to ``""``.

    Raises:
        InputError: the file is missing or malformed, a record lacks a field, or there are no records.
    """
    if os.path.isdir(source):
        # LLM-Adapters' layout (<name>/train.json, <name>/test.json); other folders go to `datasets`.
        for candidate in (f"{split}.json", "train.json", "test.json"):
            if os.path.isfile(os.path.join(source, candidate)):
                source = os.path.join(source, candidate)
                break
    if os.path.isdir(source):
        rows = _load_hub(source, split)
    elif os.path.isfile(source):
        rows = _read_json_records(source)
    elif _looks_like_path(source):
        raise InputError(f"{source}: no such data file")
    else:
        rows = _load_hub(source, split)
    if not rows:
        raise InputError(f"{source}: the dataset is empty")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{source}: record {i} is a JSON {type(row).__name__}, expected an object")
        missing = [k for k in required if k not in row or row[k] is None]
        if missing:
            raise InputError(f"{source}: record {i} lacks the field(s) {', '.join(missing)}")
        bad = [k for k in required if not isinstance(row[k], (str, int, float))]
        if bad:
            raise InputError(f"{source}: record {i} field {bad[0]!r} is a {type(row[bad[0]]).__name__}, expected text")
        rec = {k: _as_text(v) for k, v in row.items() if isinstance(v, (str, int, float)) or v is None}
        rec.setdefault("input", "")
        records.append(rec)
    return records


def split_train_val(records: list[dict], val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffles with ``seed`` and holds out ``val_set_size`` records (LLM-Adapters' ``train_test_split``)."""
    import random

    if val_set_size <= 0:
        return list(records), []
    if val_set_size >= len(records):
        raise InputError(f"--val_set_size {val_set_size} leaves no training data (the dataset has {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = [records[i] for i in order[:val_set_size]]
    train = [records[i] for i in order[val_set_size:]]
    return train, val


def tokenize_record(
    record: dict[str, str],
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool = True,
) -> dict[str, list[int]]:
    """Token ids, attention mask and labels for one training record.

    The full text is ``prompt + output`` followed by EOS (when it fits in ``cutoff_len``). With
    ``train_on_inputs=False`` the prompt tokens get label ``-100`` so the loss covers the response only.
    """
    prompt = prompter.generate_prompt(record["instruction"], record.get("input"))
    full = prompter.generate_prompt(record["instruction"], record.get("input"), record["output"])
    ids = _encode(tokenizer, full, cutoff_len)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(_encode(tokenizer, prompt, cutoff_len, add_eos=False))
        labels[:n_prompt] = [-100] * min(n_prompt, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _encode(tokenizer, text: str, cutoff_len: int, add_eos: bool = True) -> list[int]:
    ids = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids = ids + [eos]
    return ids


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (with the tokenizer's special tokens) and of ``continuation`` after it.

    The continuation ids are the tail of ``tokenize(context + continuation)`` when ``tokenize(context)`` is its
    prefix (the text is tokenized as the model sees it in training), else ``continuation`` tokenized on its own.
    """
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if len(full) > len(ctx) and full[: len(ctx)] == ctx:
        return ctx, full[len(ctx) :]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def tokenize_letter_record(record: dict, tokenizer, prompter, cutoff_len: int, where: str = "record") -> dict:
    """One multiple-choice record in the letter format, for the K-way letter loss.

    The context is exactly what ``evaluate.py --choice_format letter`` scores: the prompt of the lettered question
    followed by ``"Answer:"``; each option's letter (``" A"``, ...) must be one token after it. A context longer than
    ``cutoff_len`` keeps its last ``cutoff_len`` tokens (the answer position stays at the end).

    Returns:
        ``input_ids`` and ``attention_mask`` of the context, ``choice_ids`` (the K letter token ids) and
        ``choice_label`` (the gold option's index).

    Raises:
        InputError: the record is not a parsable multiple-choice question, or a letter is not a single token.
    """

    question = parse_choice_question(record, where)
    gold = gold_index(record, question.labels, where)
    prompt = prompter.generate_prompt(letter_instruction(question, where), record.get("input"))
    context = prompt + LETTER_PREFIX.rstrip()
    ids, choice_ids = None, []
    for letter in letter_labels(len(question.texts), where):
        ctx, cont = split_continuation(tokenizer, context, " " + letter)
        if len(cont) != 1 or (ids is not None and ctx != ids):
            raise InputError(f"{where}: the letter {letter!r} is not one token after 'Answer:' for this tokenizer")
        ids = ctx
        choice_ids.append(cont[0])
    ids = ids[-cutoff_len:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "choice_ids": choice_ids, "choice_label": gold}


def is_choice_data(path: str) -> bool:
    """Whether the records of ``path`` are multiple choice (they have gold ``answer`` labels among options)."""

    try:
        records = load_records(path, required=("instruction", "answer"), split="train")
    except InputError:
        return False  # no gold answers: generation data
    return infer_task(records, os.path.splitext(os.path.basename(path))[0]).kind == "choice"


def training_records(source: str, choice_format: str, val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of ``source`` as train.py fits them: with ``choice_format`` cloze, each
    multiple-choice record becomes its question alone -> the gold option's text (what cloze evaluation scores)."""

    records = load_records(source, split="train")
    if choice_format == "cloze":
        records = [cloze_training_record(r, f"{source}: record {i}") for i, r in enumerate(records)]
    return split_train_val(records, val_set_size, seed)


def tokenize_records(
    records: Sequence[dict],
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    choice_format: str,
    where: str,
) -> list[dict]:
    """Every record tokenized for training: the letter format's context ids, K letter ids and gold index, else
    ``tokenize_record``'s ids and labels. ``where`` names the data in errors."""
    if choice_format == "letter":
        return [
            tokenize_letter_record(r, tokenizer, prompter, cutoff_len, f"{where}: record {i}")
            for i, r in enumerate(records)
        ]
    return [tokenize_record(r, tokenizer, prompter, cutoff_len, train_on_inputs) for r in records]
