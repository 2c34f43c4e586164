"""train.py / evaluate.py / generate.py with bottleneck and parallel adapters, LLM-Adapters' command lines included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.evaluate import main as eval_main
from peft_bayes.cli.generate import main as gen_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.errors import InputError
from peft_bayes.tuners import catalogue as adapters

B = 8  # --bottleneck_size in these tests
LLM_ADAPTERS_LIST = '["up_proj", "gate_proj"]'  # LLM-Adapters' fire syntax for lists

# argv extras -> (peft_type, targets, input-side targets, preset or None, scaling)
RUNS = {
    "bottleneck": (
        ["--adapter_name", "bottleneck"],
        ("BOTTLENECK", ["down_proj", "gate_proj", "up_proj"], ["gate_proj", "up_proj"], "llm-adapters", 1.0),
    ),
    "bottleneck_series_command": (
        ["--adapter_name", "bottleneck", "--target_modules", LLM_ADAPTERS_LIST],
        ("BOTTLENECK", ["gate_proj", "up_proj"], ["gate_proj", "up_proj"], "llm-adapters", 1.0),
    ),
    "bottleneck_adapterp": (
        ["--adapter_name", "bottleneck", "--use_adapterp"],
        ("BOTTLENECK", ["down_proj"], None, "adapterp", 1.0),
    ),
    "bottleneck_parallel_command": (
        ["--adapter_name", "bottleneck", "--use_parallel_adapter", "--target_modules", '["up_proj", "down_proj"]'],
        ("PARALLEL", ["down_proj", "up_proj"], None, None, 1.0),
    ),
    "AdapterH": (["--adapter_name", "AdapterH"], ("BOTTLENECK", ["down_proj", "o_proj"], None, "adapterh", 1.0)),
    "adapterp": (["--adapter_name", "adapterp"], ("BOTTLENECK", ["down_proj"], None, "adapterp", 1.0)),
    "parallel": (["--adapter_name", "parallel"], ("PARALLEL", ["k_proj", "q_proj", "v_proj"], None, None, 1.0)),
    "Scaled_Parallel": (
        ["--adapter_name", "Scaled_Parallel"],
        ("PARALLEL", ["k_proj", "q_proj", "v_proj"], None, None, 4.0),
    ),
    "parallel_learned_gelu_bert": (
        ["--adapter_name", "parallel", "--scaling", "learned", "--non_linearity", "gelu", "--adapter_init", "bert"],
        ("PARALLEL", ["k_proj", "q_proj", "v_proj"], None, None, "learned"),
    ),
}


def _widths(llama_dir) -> dict[str, tuple[int, int]]:
    cfg = json.loads((Path(llama_dir) / "config.json").read_text())
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    return shapes | {"gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}, cfg["num_hidden_layers"]


def _formula(llama_dir, peft_type, targets, input_side, scaling) -> int:
    """Trainable weights: per layer, b * 2d for a sequential adapter (d: the side it sits on), b * (in + out) for a
    parallel one, +1 for a learned scale."""
    widths, layers = _widths(llama_dir)
    total = 0
    for t in targets:
        d_in, d_out = widths[t]
        if peft_type == "PARALLEL":
            total += B * (d_in + d_out)
        else:
            total += B * 2 * (d_in if t in (input_side or []) else d_out)
        total += scaling == "learned"
    return total * layers


@pytest.mark.parametrize("run", list(RUNS))
def test_llm_adapters_command_lines(run, llama_dir, data_file, tmp_path, train_argv, tiny_tokenizer, capsys):
    extra, (peft_type, targets, input_side, preset, scaling) = RUNS[run]
    out = tmp_path / run
    assert train_main(train_argv(llama_dir, data_file, out, "--bottleneck_size", B, *extra)) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    assert sorted(config["target_modules"]) == targets
    assert config["scaling"] == scaling and config["bottleneck_size"] == B
    if peft_type == "BOTTLENECK":
        assert config["preset"] == preset
        assert (sorted(config["input_side_modules"]) if config["input_side_modules"] else None) == input_side
    printed = re.search(r"trainable params: ([\d,]+)", capsys.readouterr().out)
    assert int(printed.group(1).replace(",", "")) == _formula(llama_dir, peft_type, targets, input_side, scaling)

    ids = tiny_tokenizer(["### Instruction:\nAnna has 3 pens.\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(llama_dir)(**ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out).eval()(**ids).logits
    assert adapted.isfinite().all() and not torch.allclose(adapted, base, atol=1e-6)


@pytest.fixture(scope="module")
def adapterh_run(tmp_path_factory, llama_dir, data_file, train_argv):
    out = tmp_path_factory.mktemp("adapterh")
    assert train_main(train_argv(llama_dir, data_file, out, "--adapter_name", "adapterh", "--bottleneck_size", B)) == 0
    return out


def test_evaluate_and_generate_check_the_adapter_kind(adapterh_run, llama_dir, data_file, tmp_path, capsys):
    common = ["--base_model", str(llama_dir), "--adapter", str(adapterh_run)]
    ev = [*common, "--data_path", data_file, "--limit", "4", "--max_new_tokens", "3", "--quiet"]
    assert eval_main([*ev, "--adapter_name", "adapterh", "--output_dir", str(tmp_path / "ok")]) == 0
    assert list((tmp_path / "ok").glob("*_summary.json"))
    capsys.readouterr()
    assert run_cli(eval_main, [*ev, "--adapter_name", "lora", "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --adapter {str(adapterh_run)!r} holds a BOTTLENECK adapter, not --adapter_name lora"
    assert not (tmp_path / "bad").exists()
    one_shot = [*common, "--adapter_name", "AdapterH", "--instruction", "Add 2 and 3.", "--temperature", "0"]
    assert gen_main([*one_shot, "--max_new_tokens", "4"]) == 0


def test_adapter_name_check_needs_an_adapter(llama_dir, data_file, tmp_path, capsys):
    argv = ["--base_model", str(llama_dir), "--data_path", data_file, "--output_dir", str(tmp_path / "ev")]
    assert run_cli(eval_main, [*argv, "--adapter_name", "adapterh"]) == 2
    assert capsys.readouterr().err.strip() == "error: --adapter_name needs --adapter (the adapter folder to check)"


def test_saved_kind_check_accepts_the_kinds_each_name_builds(tmp_path):
    """``bottleneck`` may hold a PARALLEL adapter (``--use_parallel_adapter``); the other names only their own."""
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PARALLEL"}')
    for ok in ("parallel", "Scaled_Parallel", "bottleneck"):
        adapters.check_saved_adapter(ok, str(tmp_path))
    for bad in ("adapterh", "adapterp", "lora"):
        with pytest.raises(InputError, match=f"holds a PARALLEL adapter, not --adapter_name {bad}"):
            adapters.check_saved_adapter(bad, str(tmp_path))


def test_4bit_gpt2_adapterh(model_dirs, data_file, tmp_path, train_argv):
    out = tmp_path / "q4"
    argv = train_argv(model_dirs["gpt2"], data_file, out, "--adapter_name", "adapterh", "--bottleneck_size", B)
    assert train_main([*argv, "--load_4bit"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn.c_proj", "mlp.c_proj"]
    assert (out / "adapter_model.safetensors").is_file()
