"""The demo's built-in default: a loadable tiny model and disjoint synthetic train / test sets."""

from __future__ import annotations

import json
import subprocess

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


def test_demo_steps_run_with_one_thread_unless_set(monkeypatch):
    seen = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, check, env: seen.append(env["OMP_NUM_THREADS"]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    demo.run("train", ["--help"])
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    demo.run("train", ["--help"])
    assert seen == [demo.THREADS, "2"] and demo.THREADS == "1"


def test_demo_steps_run_without_a_checkout(monkeypatch, tmp_path):
    """Installed without the repo-root scripts, each step runs the same entry point inline (not ``-m``: the cli
    modules have no ``__main__`` block, so ``python -m peft_bayes.cli.train`` would do nothing and exit 0)."""
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    cmd = demo.command("train", [])
    assert cmd[1] == "-c"
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and "required: --base_model" in out.stderr  # train.py's main ran
