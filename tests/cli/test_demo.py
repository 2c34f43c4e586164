"""The demo's built-in default: a loadable tiny model and disjoint synthetic train / test sets."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_bayes.cli import demo
from peft_bayes.cli.train import build_parser


def test_demo_prepare_writes_model_and_data(tmp_path):
    model_dir, train_path, test_path = demo.prepare(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and model.config.hidden_size == demo.MODEL["hidden_size"]
    assert model.config.vocab_size == len(tok)
    train, test = json.loads(train_path.read_text()), json.loads(test_path.read_text())
    assert len(train) == demo.DATA["n_train"] and len(test) == demo.DATA["n_test"]
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in test)


def test_demo_flags_are_valid_train_flags():
    args = build_parser().parse_args(["--base_model", "m", *demo.TRAIN_FLAGS])
    assert args.adapter_name == "lora" and args.train_on_inputs is False
