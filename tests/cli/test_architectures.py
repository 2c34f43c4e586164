"""train.py -> evaluate.py -> generate.py end to end on every tiny architecture, and on 4-bit / 8-bit bases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_bayes.cli import evaluate as evaluate_mod
from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.generate import main as generate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data import Prompter
from peft_bayes.data.answers import infer_task, is_correct
from peft_bayes.data.loading import load_records
from peft_bayes.tiny import TINY_ARCHITECTURES
from peft_bayes.tuners import catalogue as adapters

SUMMARY_KEYS = {"n", "accuracy", "wall_time_s", "examples_per_s"}
ROW_KEYS = {"prompt", "generation", "extracted", "gold", "correct"}
TEMPLATE = "alpaca_short"  # the template train_argv trains with


def _eval_argv(base, data, out, *extra):
    return [
        "--base_model",
        str(base),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--limit",
        "6",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "6",
        "--prompt_template",
        TEMPLATE,
        "--quiet",
        *map(str, extra),
    ]


def _check_eval_outputs(out_dir, data_file, n=6) -> tuple[dict, list[dict]]:
    """The summary and the per-example rows have the documented keys and agree with each other and the data."""
    summary = json.loads((out_dir / "arith_summary.json").read_text())
    rows = json.loads((out_dir / "arith_predictions.json").read_text())
    assert SUMMARY_KEYS <= set(summary), summary
    assert summary["n"] == n == len(rows)
    assert summary["wall_time_s"] > 0 and summary["examples_per_s"] > 0
    assert summary["peak_rss_bytes"] > 2**20 and summary["peak_cuda_bytes"] is None  # Linux CI, no CUDA
    records = load_records(data_file, required=("instruction", "answer"))[:n]
    task = infer_task(records, "arith")
    for row, rec in zip(rows, records):
        assert ROW_KEYS <= set(row), row
        assert row["gold"] == rec["answer"] and rec["instruction"] in row["prompt"]
        assert isinstance(row["correct"], bool)
        assert row["correct"] == is_correct(row["extracted"], row["gold"], task)
    n_correct = sum(r["correct"] for r in rows)
    assert summary["correct"] == n_correct
    assert math.isclose(summary["accuracy"], n_correct / n) and 0.0 <= summary["accuracy"] <= 1.0
    return summary, rows


def _greedy_response(base, adapter, instruction: str, max_new_tokens: int) -> str:
    """Reference: plain ``generate`` of base + adapter, greedy, new tokens decoded."""
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    enc = tokenizer(Prompter.from_name(TEMPLATE).generate_prompt(instruction), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _assert_trained_adapter(folder):
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b), "lora_B still zero: no optimizer step happened"


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_train_evaluate_generate(arch, model_dirs, data_file, tmp_path, train_argv, capsys):
    base, adapter, results = model_dirs[arch], tmp_path / "adapter", tmp_path / "eval"

    assert train_main(train_argv(base, data_file, adapter)) == 0
    saved = json.loads((adapter / "train_args.json").read_text())
    config = json.loads((Path(base) / "config.json").read_text())
    assert saved["adapter_name"] == "lora" and saved["optimizer_steps"] == 2
    assert saved["target_modules_resolved"] == sorted(adapters.default_target_modules("lora", config["model_type"]))
    _assert_trained_adapter(adapter)

    capsys.readouterr()
    assert evaluate_main(_eval_argv(base, data_file, results, "--adapter", adapter)) == 0
    summary, _ = _check_eval_outputs(results, data_file)
    assert summary["adapter"] == str(adapter) and summary["batch_size"] == 4 and summary["max_new_tokens"] == 6
    assert "| arith | 6 |" in capsys.readouterr().out  # the Markdown summary line

    instruction = "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?"
    argv = ["--base_model", base, "--adapter", adapter, "--prompt_template", TEMPLATE, "--instruction", instruction]
    assert generate_main([*map(str, argv), "--temperature", "0", "--max_new_tokens", "5"]) == 0
    printed = capsys.readouterr().out
    # The streamed response is the greedy continuation of the adapted model, then a newline.
    assert len(printed) > 1 and printed == _greedy_response(base, adapter, instruction, 5) + "\n"


def _spy_eval_model(monkeypatch) -> dict:
    """Records the model evaluate.py / generate.py load (both go through evaluate.load_eval_model)."""
    seen = {}
    real = evaluate_mod.load_eval_model

    def load(args):
        model, tokenizer = real(args)
        seen["model"] = model
        return model, tokenizer

    monkeypatch.setattr(evaluate_mod, "load_eval_model", load)
    return seen


@pytest.fixture(scope="module")
def qlora_adapter(llama_dir, data_file, tmp_path_factory, train_argv):
    """A 2-step LoRA trained on a 4-bit (NF4) tiny llama; returns (folder, {lora module: base layer type})."""
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    base_layers = {}
    real_attach = adapters.attach_adapter

    def attach(model, peft_config):  # the model train.py goes on to train
        peft_model = real_attach(model, peft_config)
        base_layers.update(
            {name: type(m.get_base_layer()) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
        )
        return peft_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters, "attach_adapter", attach)
        assert train_main(train_argv(llama_dir, data_file, out, "--load_4bit")) == 0
    return out, base_layers


def test_4bit_lora_training(qlora_adapter):
    out, base_layers = qlora_adapter
    # LoRA wrapped 4-bit layers, i.e. it trained on top of the quantised base.
    assert base_layers and all(t is bnb.nn.Linear4bit for t in base_layers.values()), base_layers
    saved = json.loads((out / "train_args.json").read_text())
    assert saved["load_4bit"] is True and saved["load_8bit"] is False and saved["optimizer_steps"] == 2
    assert saved["bnb_4bit_quant_type"] == "nf4" and math.isfinite(saved["train_loss"])
    assert (out / "adapter_config.json").is_file()
    _assert_trained_adapter(out)


def test_4bit_evaluate(qlora_adapter, llama_dir, data_file, tmp_path, monkeypatch):
    out, _ = qlora_adapter
    seen = _spy_eval_model(monkeypatch)
    argv = _eval_argv(llama_dir, data_file, tmp_path, "--adapter", out, "--load_4bit")
    assert evaluate_main(argv) == 0
    model = seen["model"]
    assert isinstance(model, PeftModel) and not model.training
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    summary, _ = _check_eval_outputs(tmp_path, data_file)
    assert summary["adapter"] == str(out)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_8bit_evaluate_smoke(llama_dir, data_file, tmp_path, monkeypatch):
    seen = _spy_eval_model(monkeypatch)
    argv = _eval_argv(llama_dir, data_file, tmp_path, "--load_8bit", "--max_new_tokens", "4")
    assert evaluate_main(argv) == 0
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in seen["model"].modules())
    summary, _ = _check_eval_outputs(tmp_path, data_file)
    assert summary["adapter"] is None and summary["max_new_tokens"] == 4
