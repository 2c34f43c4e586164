"""Library-level tests of ``peft_bayes.evaluation``: a posterior's fit data (``fit_data.py``) and a test set made
ready to score (``datasets.load_eval_set``), each against what it is built from, written out here."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from peft_bayes.data import Prompter, tokenize_record
from peft_bayes.data.synthetic import make_arithmetic_problems, make_choice_problems
from peft_bayes.errors import InputError
from peft_bayes.evaluation.choice_scoring import DEFAULT_PREFIX
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.fit_data import choice_scorer, fit_batches, lm_batches
from peft_bayes.posterior.likelihood import IGNORE
from peft_bayes.tiny import build_tiny_model

ARGS = Namespace(
    choice_format="label", choice_prefix=None, choice_norm="none", choice_scoring="full", batch_size=2, cutoff_len=64
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit_data")
    choice, math = root / "choice.json", root / "math.json"
    choice.write_text(json.dumps(make_choice_problems(5, seed=2, n_options=4)))
    math.write_text(json.dumps(make_arithmetic_problems(5, seed=3)))
    return {"choice": str(choice), "math": str(math)}


@pytest.fixture(scope="module")
def prompter():
    return Prompter.from_name("alpaca_short")


def test_lm_batches_are_the_records_tokenized_right_padded_with_the_prompt_masked(files, tiny_tokenizer, prompter):
    records = json.loads(open(files["math"]).read())[:4]
    batches = lm_batches(files["math"], 4, tiny_tokenizer, prompter, 3, 64)
    assert [b.input_ids.shape[0] for b in batches] == [3, 1]
    rows = [(b.input_ids[i], b.attention_mask[i], b.labels[i]) for b in batches for i in range(b.input_ids.shape[0])]
    pad = tiny_tokenizer.pad_token_id if tiny_tokenizer.pad_token_id is not None else 0
    for record, (ids, mask, labels) in zip(records, rows):
        want = tokenize_record(record, tiny_tokenizer, prompter, 64, False)
        n = len(want["input_ids"])
        assert ids[:n].tolist() == want["input_ids"] and (ids[n:] == pad).all()
        assert mask[:n].all() and not mask[n:].any()
        assert labels[:n].tolist() == want["labels"] and (labels[n:] == IGNORE).all()
        assert (labels[:n] == IGNORE).any() and (labels[:n] != IGNORE).any()  # prompt masked, response kept


def test_choice_fit_batches_hold_every_option_and_the_gold_labels(files, tiny_tokenizer, prompter):
    model = build_tiny_model("llama", tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=4)
    records = json.loads(open(files["choice"]).read())
    batches = list(fit_batches(files["choice"], None, "choice", model, tiny_tokenizer, prompter, ARGS, 2))
    golds = [int(r["answer"].removeprefix("answer")) - 1 for r in records]
    assert torch.cat([b.labels for b in batches]).tolist() == golds
    assert sum(b.input_ids.shape[0] for b in batches) == 4 * len(records)  # one row per option
    test = load_eval_set("choice", files["choice"], None, prompter)
    assert test.golds == golds and len(test.pairs[0]) == 4
    context, scored = test.pairs[0][golds[0]]  # label format: the prompt and the prefix, then the label is scored
    assert context == test.prompts[0] + DEFAULT_PREFIX.rstrip() and scored == " " + records[0]["answer"]


def test_non_choice_data_is_a_one_line_error(files, tiny_tokenizer, prompter):
    with pytest.raises(InputError, match=r"math.json: the choice likelihood needs multiple-choice data"):
        fit_batches(files["math"], None, "choice", None, tiny_tokenizer, prompter, ARGS, 2)
    with pytest.raises(InputError, match=r"math.json: temperature scaling needs multiple-choice validation data"):
        choice_scorer(files["math"], None, None, tiny_tokenizer, prompter, ARGS)
    assert choice_scorer(files["choice"], 3, None, tiny_tokenizer, prompter, ARGS).labels == [
        int(r["answer"].removeprefix("answer")) - 1 for r in json.loads(open(files["choice"]).read())[:3]
    ]
