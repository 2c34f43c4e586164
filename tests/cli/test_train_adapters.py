"""train.py trains every PEFT-native adapter; the saved adapter loads back in plain PEFT with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_bayes.cli.train import main as train_main
from peft_bayes.tuners import catalogue as adapters

NATIVE = ["lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "prefix-tuning", "prompt-tuning", "p-tuning"]


def test_every_native_adapter_is_offered():
    assert set(NATIVE) <= set(adapters.ADAPTERS)


@pytest.mark.parametrize("name", NATIVE)
def test_adapter_trains_saves_and_reloads(name, llama_dir, data_file, tmp_path, tiny_tokenizer, train_argv):
    out = tmp_path / name
    extra = ["--adapter_name", name, "--num_virtual_tokens", "4", "--oft_block_size", "8"]
    assert train_main(train_argv(llama_dir, data_file, out, *extra)) == 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "train_args.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "train_args.json").read_text())
    assert saved["adapter_name"] == name and saved["optimizer_steps"] == 2
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())

    # The adapter changed something: the adapted model differs from the base model.
    ids = tiny_tokenizer(["### Instruction:\nAnna has 3 pens.\n\n### Response:\n"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        base_logits = base(**ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out).eval()
        logits = peft_model(**ids).logits[:, -base_logits.shape[1] :]
    assert not torch.allclose(logits, base_logits, atol=1e-6)


def test_default_targets_follow_peft_tables():
    assert adapters.default_target_modules("lora", "llama") == ["q_proj", "v_proj"]
    assert adapters.default_target_modules("lora", "gpt2") == ["c_attn"]
    assert adapters.default_target_modules("lora", "bloom") == ["query_key_value"]
    assert adapters.default_target_modules("ia3", "llama") == ["k_proj", "v_proj", "down_proj"]
    assert adapters.default_target_modules("prefix-tuning", "llama") is None


@pytest.mark.parametrize("name", ["adalora", "AdaLoRA"])
def test_adalora_budget_callback_whatever_the_case(name, llama_dir, data_file, tmp_path, train_argv, monkeypatch):
    from peft_bayes.training import AdaLoraCallback, PeftBayesTrainer

    seen = []

    def fake_train(self, *args, **kwargs):
        seen.extend(type(cb) for cb in self.callback_handler.callbacks)
        raise KeyboardInterrupt  # stop before training: only the trainer's set-up is under test

    monkeypatch.setattr(PeftBayesTrainer, "train", fake_train)
    with pytest.raises(KeyboardInterrupt):
        train_main(train_argv(llama_dir, data_file, tmp_path / name, "--adapter_name", name))
    assert AdaLoraCallback in seen
