"""The scripts with --prompt_template chat on a tiny LLaMA whose tokenizer carries a ChatML template."""

from __future__ import annotations

import copy
import json

import pytest

from peft_bayes import models as modeling_mod
from peft_bayes.cli import evaluate, generate, train
from peft_bayes.errors import InputError
from peft_bayes.tiny import save_tiny_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "llama", "llama", tokenizer=tok, hidden_size=32)


def test_train_evaluate_generate_with_chat_template(chat_model_dir, data_file, train_argv, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = train_argv(chat_model_dir, data_file, out, "--train_on_inputs", "false", "--cutoff_len", "256")
    argv[argv.index("alpaca_short")] = "chat"  # (the ChatML markers are many byte tokens to the tiny tokenizer)
    assert train.main(argv) == 0
    args = json.loads((out / "train_args.json").read_text())
    assert args["prompt_template"] == "chat" and args["optimizer_steps"] == 2
    flags = ["--base_model", chat_model_dir, "--adapter", str(out), "--prompt_template", "chat"]
    assert (
        evaluate.main(
            [
                *flags,
                "--data_path",
                data_file,
                "--limit",
                "3",
                "--max_new_tokens",
                "4",
                "--output_dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "arith_predictions.json").read_text())
    first = json.loads(open(data_file, encoding="utf-8").read())[0]["instruction"]
    assert rows[0]["prompt"] == f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n"
    capsys.readouterr()
    assert generate.main([*flags, "--instruction", "Add 2 and 3.", "--temperature", "0", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_without_template_fails_before_the_model_loads(llama_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(modeling_mod, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    message = f"tokenizer '{llama_dir}' has no chat template"
    with pytest.raises(InputError, match=message):
        evaluate.main(["--base_model", llama_dir, "--data_path", data_file, "--prompt_template", "chat"])
    with pytest.raises(InputError, match=message):
        generate.main(["--base_model", llama_dir, "--prompt_template", "chat", "--instruction", "Hi"])
    with pytest.raises(InputError, match=message):
        train.main(
            [
                "--base_model",
                llama_dir,
                "--data_path",
                data_file,
                "--output_dir",
                str(tmp_path / "o"),
                "--prompt_template",
                "chat",
                "--val_set_size",
                "0",
            ]
        )
    assert not (tmp_path / "o").exists()
