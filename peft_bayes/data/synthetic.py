"""Synthetic arithmetic word problems in the LLM-Adapters schema, for demos and tests that must run offline.

Each problem adds or subtracts two small numbers, e.g.::

    {"instruction": "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?",
     "input": "",
     "output": "3 + 4 = 7. The answer is 7",
     "answer": "7"}

A problem is identified by its *content*: the template it was written with and its two numbers. Names and objects
are decoration drawn at random. :func:`make_arithmetic_problems` draws distinct contents, so the train and test files
written by :func:`write_demo_data` never share one.

:func:`make_choice_problems` turns them into multiple-choice questions in LLM-Adapters' commonsense format
(``Answer1: ... Answer format: answer1/answer2/...``, output ``"the correct answer is answer2"``), or, with
``kind="compare"``, asks which of several numbers is the largest (a differently worded set, e.g. for
out-of-distribution tests); :func:`write_choice_data` writes a train and a test file of them.
"""

from __future__ import annotations

import json
import os
import random
import tempfile

from peft_bayes.errors import InputError

# (name, subject pronoun, object pronoun)
_PEOPLE = (
    ("Tom", "he", "him"),
    ("Anna", "she", "her"),
    ("Ben", "he", "him"),
    ("Lucy", "she", "her"),
    ("Sam", "he", "him"),
    ("Mia", "she", "her"),
    ("Jack", "he", "him"),
    ("Emma", "she", "her"),
    ("Leo", "he", "him"),
    ("Zoe", "she", "her"),
)
# (singular, plural)
_OBJECTS = (
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("marble", "marbles"),
    ("book", "books"),
    ("cookie", "cookies"),
    ("stamp", "stamps"),
    ("orange", "oranges"),
    ("toy car", "toy cars"),
    ("sticker", "stickers"),
    ("shell", "shells"),
)

# Template id -> (operator, text). Fields: {name} {He} {him} {friend} {a} {b} {obj_a} {obj_b} {objs}, where
# obj_a / obj_b agree in number with a / b and objs is the plural.
_TEMPLATES: dict[str, tuple[str, str]] = {
    "add_buy": ("+", "{name} has {a} {obj_a}. {He} buys {b} more {obj_b}. How many {objs} does {name} have now?"),
    "add_basket": (
        "+",
        "There are {a} {obj_a} in a basket. {name} puts {b} more {obj_b} in the basket. "
        "How many {objs} are in the basket now?",
    ),
    "add_gift": ("+", "{name} had {a} {obj_a} and {friend} gave {him} {b} {obj_b}. How many {objs} does {name} have?"),
    "add_pick": (
        "+",
        "{name} found {a} {obj_a} in the morning and {b} {obj_b} in the afternoon. "
        "How many {objs} did {name} find in total?",
    ),
    "add_together": (
        "+",
        "{name} has {a} {obj_a}. {friend} has {b} {obj_b}. How many {objs} do they have together?",
    ),
    "add_box": ("+", "A box holds {a} {obj_a}. {name} adds {b} {obj_b} to the box. How many {objs} are in the box?"),
    "add_days": (
        "+",
        "{name} collected {a} {obj_a} on Monday and {b} {obj_b} on Tuesday. How many {objs} did {name} collect?",
    ),
    "add_win": ("+", "{name} won {a} {obj_a} at the fair. Then {he} won {b} more. How many {objs} did {name} win?"),
    "sub_give": (
        "-",
        "{name} has {a} {obj_a}. {He} gives {b} {obj_b} to {friend}. How many {objs} does {name} have left?",
    ),
    "sub_table": (
        "-",
        "There are {a} {obj_a} on the table. {name} takes {b} of them. How many {objs} are left on the table?",
    ),
    "sub_lose": ("-", "{name} had {a} {obj_a}. {He} lost {b} {obj_b}. How many {objs} does {name} have now?"),
    "sub_sell": ("-", "{name} bought {a} {obj_a} and sold {b} of them. How many {objs} does {name} still have?"),
    "sub_compare": (
        "-",
        "{name} has {a} {obj_a} and {friend} has {b} {obj_b}. How many more {objs} does {name} have than {friend}?",
    ),
    "sub_bag": (
        "-",
        "There were {a} {obj_a} in a bag. {name} took out {b} {obj_b}. How many {objs} are still in the bag?",
    ),
    "sub_need": (
        "-",
        "{name} needs {a} {obj_a}. {He} already has {b} {obj_b}. How many more {objs} does {name} need?",
    ),
    "sub_broke": ("-", "{name} had {a} {obj_a}, but {b} of them broke. How many {objs} are not broken?"),
}


def _contents(max_operand: int) -> list[tuple[str, int, int]]:
    """Every distinct (template id, a, b): operands in ``1..max_operand``, subtraction with ``b <= a``."""
    contents = []
    for template_id, (op, _) in _TEMPLATES.items():
        for a in range(1, max_operand + 1):
            for b in range(1, (a if op == "-" else max_operand) + 1):
                contents.append((template_id, a, b))
    return contents


def _render(template_id: str, a: int, b: int, rng: random.Random) -> dict[str, str]:
    op, text = _TEMPLATES[template_id]
    (name, he, him), (friend, _, _) = rng.sample(_PEOPLE, 2)
    singular, plural = rng.choice(_OBJECTS)
    instruction = text.format(
        name=name,
        he=he,
        He=he.capitalize(),
        him=him,
        friend=friend,
        a=a,
        b=b,
        obj_a=singular if a == 1 else plural,
        obj_b=singular if b == 1 else plural,
        objs=plural,
    )
    result = a + b if op == "+" else a - b
    return {
        "instruction": instruction,
        "input": "",
        "output": f"{a} {op} {b} = {result}. The answer is {result}",
        "answer": str(result),
    }


def make_arithmetic_problems(n: int, seed: int = 0, max_operand: int = 9) -> list[dict[str, str]]:
    """Makes ``n`` addition and subtraction word problems with distinct contents.

    Args:
        n: Number of problems. At most the number of distinct (template, numbers) contents, which is
            ``8 * max_operand**2`` plus ``4 * max_operand * (max_operand + 1)`` (1008 for ``max_operand=9``).
        seed: Seed of the draw; the same arguments always give the same problems in the same order.
        max_operand: Largest operand. Operands start at 1; subtraction never goes below 0.

    Returns:
        Records ``{"instruction", "input", "output", "answer"}``: ``input`` is empty, ``output`` a one-line
        rationale such as ``"3 + 4 = 7. The answer is 7"`` and ``answer`` the result as a string.

    Raises:
        InputError: ``n`` is negative or larger than the number of distinct problems, or ``max_operand < 1``.
    """
    if max_operand < 1:
        raise InputError(f"max_operand must be at least 1, got {max_operand}")
    contents = _contents(max_operand)
    if not 0 <= n <= len(contents):
        raise InputError(
            f"n must be between 0 and {len(contents)} (distinct problems for max_operand={max_operand}), got {n}"
        )
    rng = random.Random(seed)
    rng.shuffle(contents)
    return [_render(template_id, a, b, rng) for template_id, a, b in contents[:n]]


def _write_json_atomic(records: list[dict[str, str]], path: str) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_demo_data(
    folder: str, n_train: int = 400, n_test: int = 100, seed: int = 0, max_operand: int = 9
) -> tuple[str, str]:
    """Writes a train and a test set of arithmetic problems as JSON lists.

    The two files share no (template, numbers) content; names and objects are random decoration.

    Args:
        folder: Output folder, created if missing.
        n_train: Number of training problems.
        n_test: Number of test problems.
        seed: Seed of the draw.
        max_operand: Largest operand (see :func:`make_arithmetic_problems`).

    Returns:
        The paths of ``train.json`` and ``test.json`` inside ``folder``.
    """
    problems = make_arithmetic_problems(n_train + n_test, seed=seed, max_operand=max_operand)
    os.makedirs(folder, exist_ok=True)
    train_path, test_path = os.path.join(folder, "train.json"), os.path.join(folder, "test.json")
    _write_json_atomic(problems[:n_train], train_path)
    _write_json_atomic(problems[n_train:], test_path)
    return train_path, test_path


CHOICE_KINDS = ("arithmetic", "compare")
_COMPARE_QUESTION = "Which of these numbers is the largest?"


def _choice_record(question: str, values: list[int], correct: int) -> dict[str, str]:
    """A record in LLM-Adapters' commonsense format; ``values[correct]`` is the right option."""
    options = " ".join(f"Answer{i + 1}: {v}" for i, v in enumerate(values))
    labels = "/".join(f"answer{i + 1}" for i in range(len(values)))
    label = f"answer{correct + 1}"
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{options}\n\n"
        f"Answer format: {labels}",
        "input": "",
        "output": f"the correct answer is {label}",
        "answer": label,
    }


def _arithmetic_choices(n: int, seed: int, n_options: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for problem in make_arithmetic_problems(n, seed=seed):
        right = int(problem["answer"])
        # Distractors near the right answer, never negative, all distinct.
        pool = [v for v in range(max(0, right - 2 * n_options), right + 2 * n_options + 1) if v != right]
        values = rng.sample(pool, n_options - 1)
        correct = rng.randrange(n_options)
        values.insert(correct, right)
        records.append(_choice_record(problem["instruction"], values, correct))
    return records


def _compare_choices(n: int, n_options: int, rng: random.Random) -> list[dict[str, str]]:
    seen: set[tuple[int, ...]] = set()
    records = []
    while len(records) < n:
        values = rng.sample(range(100), n_options)
        if tuple(values) in seen:
            continue
        seen.add(tuple(values))
        records.append(_choice_record(_COMPARE_QUESTION, values, values.index(max(values))))
    return records


def make_choice_problems(n: int, seed: int = 0, n_options: int = 4, kind: str = "arithmetic") -> list[dict[str, str]]:
    """Makes ``n`` multiple-choice problems in LLM-Adapters' commonsense format.

    Example (``kind="arithmetic"``)::

        {"instruction": "Please choose the correct answer to the question: Tom has 3 apples. He buys 4 more "
                        "apples. How many apples does Tom have now?\\n\\nAnswer1: 6 Answer2: 7 Answer3: 9 "
                        "Answer4: 2\\n\\nAnswer format: answer1/answer2/answer3/answer4",
         "input": "", "output": "the correct answer is answer2", "answer": "answer2"}

    Args:
        n: Number of problems (at most 1008 for ``"arithmetic"``, the distinct arithmetic problems).
        seed: Seed of the draw; the same arguments always give the same problems.
        n_options: Options per question, 2 to 9. The right one sits at a uniformly random position; the others
            are distinct from it and from each other.
        kind: ``"arithmetic"`` (the word problems of :func:`make_arithmetic_problems`, distinct contents) or
            ``"compare"`` ("Which of these numbers is the largest?", distinct option lists of numbers 0-99).

    Raises:
        InputError: ``kind``, ``n`` or ``n_options`` out of range.
    """
    if kind not in CHOICE_KINDS:
        raise InputError(f"kind must be one of {'/'.join(CHOICE_KINDS)}, got {kind!r}")
    if not 2 <= n_options <= 9:
        raise InputError(f"n_options must be between 2 and 9, got {n_options}")
    if n < 0:
        raise InputError(f"n must not be negative, got {n}")
    rng = random.Random(f"choice-{kind}-{seed}")
    if kind == "arithmetic":
        return _arithmetic_choices(n, seed, n_options, rng)
    return _compare_choices(n, n_options, rng)


def write_choice_data(
    folder: str, n_train: int = 400, n_test: int = 100, seed: int = 0, n_options: int = 4, kind: str = "arithmetic"
) -> tuple[str, str]:
    """Writes ``train.json`` and ``test.json`` of :func:`make_choice_problems` (no problem in both) atomically.

    Returns:
        The paths of ``train.json`` and ``test.json`` inside ``folder``.
    """
    problems = make_choice_problems(n_train + n_test, seed=seed, n_options=n_options, kind=kind)
    os.makedirs(folder, exist_ok=True)
    train_path, test_path = os.path.join(folder, "train.json"), os.path.join(folder, "test.json")
    _write_json_atomic(problems[:n_train], train_path)
    _write_json_atomic(problems[n_train:], test_path)
    return train_path, test_path
