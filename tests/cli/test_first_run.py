"""What a new user meets in the first minutes: the adapter's recorded prompt template and choice format,
fast failures on a mistyped model path, quiet logs, help with true defaults, suggestions for typos."""

from __future__ import annotations

import json

import pytest

from peft_bayes.cli import evaluate, generate
from peft_bayes.cli import train as train_cli
from peft_bayes.cli.common import apply_recorded_settings
from peft_bayes.errors import InputError

ALPACA_PREAMBLE = "Below is an instruction"


@pytest.fixture(scope="module")
def short_adapter(llama_dir, data_file, tmp_path_factory, train_argv):
    """A LoRA adapter trained with --prompt_template alpaca_short (train_argv's template)."""
    out = tmp_path_factory.mktemp("short_adapter")
    assert train_cli.main(train_argv(llama_dir, data_file, out, "--max_steps", "1")) == 0
    assert json.loads((out / "train_args.json").read_text())["prompt_template"] == "alpaca_short"
    return out


def _eval_prompts(llama_dir, data_file, adapter, out, *flags) -> list[str]:
    argv = ["--base_model", str(llama_dir), "--adapter", str(adapter), "--data_path", data_file, "--limit", "2",
            "--max_new_tokens", "4", "--output_dir", str(out), *flags]  # fmt: skip
    assert evaluate.main(argv) == 0
    name = data_file.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return [r["prompt"] for r in json.loads((out / f"{name}_predictions.json").read_text())]


def test_evaluate_takes_the_recorded_template_and_says_so(llama_dir, data_file, short_adapter, tmp_path, capsys):
    prompts = _eval_prompts(llama_dir, data_file, short_adapter, tmp_path / "a")
    assert prompts[0].startswith("### Instruction:\n")  # alpaca_short, not alpaca's preamble
    err = capsys.readouterr().err
    assert f"--prompt_template alpaca_short: as recorded in {short_adapter}/train_args.json" in err


def test_conflicting_explicit_template_is_refused_unless_overridden(llama_dir, data_file, short_adapter, tmp_path):
    with pytest.raises(InputError, match=r"--prompt_template alpaca \(trained with alpaca_short\).*--override_train"):
        _eval_prompts(llama_dir, data_file, short_adapter, tmp_path / "a", "--prompt_template", "alpaca")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    prompts = _eval_prompts(
        llama_dir, data_file, short_adapter, tmp_path / "b", "--prompt_template", "alpaca", "--override_train_args"
    )
    assert prompts[0].startswith(ALPACA_PREAMBLE)


def test_generate_takes_the_recorded_template(llama_dir, short_adapter, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(generate.Responder, "respond", lambda self, instruction, *a, **k: seen.append(self.prompter))
    base = ["--base_model", str(llama_dir), "--adapter", str(short_adapter), "--instruction", "What is 4 plus 3?"]
    assert generate.main(base) == 0
    assert seen[-1].generate_prompt("x").startswith("### Instruction:\nx")
    assert "--prompt_template alpaca_short: as recorded" in capsys.readouterr().err
    with pytest.raises(InputError, match="train_args.json"):
        generate.main([*base, "--prompt_template", "alpaca"])
    assert generate.main([*base, "--prompt_template", "alpaca", "--override_train_args"]) == 0
    assert seen[-1].generate_prompt("x").startswith(ALPACA_PREAMBLE)


def _recorded(tmp_path, **train_args):
    (tmp_path / "train_args.json").write_text(json.dumps(train_args))
    return tmp_path


@pytest.mark.parametrize(
    "recorded, given, expected",
    [
        ({"prompt_template": "chat", "choice_format": "letter"}, {}, ("chat", "letter")),
        # train.py records its default "label" for any data: it says nothing about scoring, never enforced
        ({"prompt_template": "alpaca", "choice_format": "label"}, {"choice_format": "cloze"}, ("alpaca", "cloze")),
        ({"prompt_template": "alpaca", "choice_format": "label"}, {}, ("alpaca", "label")),
        ({}, {}, ("alpaca", "label")),  # an adapter from elsewhere: the defaults
        ({}, {"prompt_template": "chat"}, ("chat", "label")),
    ],
)
def test_recorded_settings_fill_unset_flags(recorded, given, expected, tmp_path):
    args = evaluate.build_parser().parse_args(
        ["--base_model", "m", "--adapter", str(_recorded(tmp_path, **recorded))]
        + [x for k, v in given.items() for x in (f"--{k}", v)]
    )
    apply_recorded_settings(args, {"prompt_template": "alpaca", "choice_format": "label"})
    assert (args.prompt_template, args.choice_format) == expected


def test_recorded_choice_format_conflict_is_refused(tmp_path):
    adapter = _recorded(tmp_path, prompt_template="alpaca", choice_format="letter")
    args = evaluate.build_parser().parse_args(
        ["--base_model", "m", "--adapter", str(adapter), "--choice_format", "cloze"]
    )
    with pytest.raises(InputError, match=r"--choice_format cloze \(trained with letter\)"):
        apply_recorded_settings(args, {"prompt_template": "alpaca", "choice_format": "label"})


# --- a mistyped model path fails at once; no retry storm offline -------------------------------------------------


@pytest.mark.parametrize("path", ["demo_run/modle", "./modle", "demo_run/sub/modle", "~/no-such-model-here"])
def test_local_looking_model_path_fails_at_once(path, tmp_path, monkeypatch):
    from peft_bayes.models import check_model_source

    (tmp_path / "demo_run").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"base model .* not found: no such directory"):
        check_model_source(path, "base model")


def test_hub_probe_tells_open_from_closed_ports():
    import socket

    from peft_bayes.models import _hub_reachable

    probe = _hub_reachable.__wrapped__  # uncached: one port, open then closed

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe(f"http://127.0.0.1:{port}")
    assert not probe(f"http://127.0.0.1:{port}")  # closed now: refused


def test_unreachable_hub_switches_to_the_local_cache(monkeypatch, capsys):
    import huggingface_hub.constants as hub

    from peft_bayes import models as modeling

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(modeling, "_hub_reachable", lambda endpoint: False)
    assert modeling.check_model_source("modle", "base model") == "modle"
    assert hub.HF_HUB_OFFLINE and modeling.os.environ["HF_HUB_OFFLINE"] == "1"
    assert "cannot be reached: looking for 'modle' in the local Hub cache only" in capsys.readouterr().err


def test_missing_hub_model_without_network_is_one_quick_error(data_file, tmp_path):
    """No HF_HUB_OFFLINE, and the Hub at a closed local port: one probe, then the local cache; no retries."""
    import os
    import socket
    import subprocess
    import sys

    from peft_bayes.cli.demo import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--base_model",
            "modle",
            "--data_path",
            data_file,
            "--val_set_size",
            "5000",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: base model 'modle' could not be loaded")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert sum("cannot be reached: looking for 'modle' in the local Hub cache only" in line for line in lines) == 1
    assert "Retry" not in proc.stderr and "leaves no training data" not in proc.stderr  # model checked first


def test_train_names_a_missing_model_before_data_size_checks(llama_dir, data_file, tmp_path, train_argv):
    argv = train_argv(tmp_path / "modle", data_file, tmp_path / "out")
    argv[argv.index("--val_set_size") + 1] = "5000"  # more than the 32 examples: the data check would fail too
    with pytest.raises(InputError, match="base model .*modle.* not found"):
        train_cli.main(argv)


# --- quiet logs ----------------------------------------------------------------------------------------------------

QUIET_SCRIPT = """
import warnings
import peft_bayes, bitsandbytes  # noqa: F401
from peft import LoraConfig, get_peft_model
from peft_bayes.tiny import build_tiny_model, build_tokenizer
model = build_tiny_model("llama", build_tokenizer(), hidden_size=32, num_heads=4)
get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
warnings.warn("another FutureWarning still shows", FutureWarning)
"""


def test_known_third_party_noise_is_filtered_and_the_rest_shows():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", QUIET_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is_gradient_checkpointing" not in proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr
    assert "another FutureWarning still shows" in proc.stderr


def test_bitsandbytes_cpu_kernel_message_is_dropped_other_messages_kept():
    import logging

    from peft_bayes._quiet import BNB_CPU_KERNEL

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(BNB_CPU_KERNEL + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("something else from bitsandbytes")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else from bitsandbytes"]


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_is_plain_lines_off_a_terminal_and_redrawn_on_one():
    from peft_bayes.io import progress_printer

    log, tty = _Stream(False), _Stream(True)
    for stream in (log, tty):
        progress = progress_printer("scoring", stream=stream)
        for done in range(1, 101):
            progress(done, 100)
    lines = log.text.splitlines()
    assert "\r" not in log.text and lines[-1] == "scoring: 100/100" and len(lines) == 11
    assert tty.text.count("\r") == 100 and tty.text.endswith("scoring: 100/100\n")


def test_training_log_off_a_terminal_has_no_bars_and_no_unscheduled_checkpoint(
    llama_dir, data_file, tmp_path, train_argv, capsys
):
    out = tmp_path / "out"
    assert train_cli.main(train_argv(llama_dir, data_file, out, "--max_steps", "3", "--save_step", "100000")) == 0
    captured = capsys.readouterr()
    assert "it/s]" not in captured.err and "Loading weights" not in captured.err
    assert "{'loss'" in captured.out  # the Trainer's log lines remain
    assert not list(out.glob("checkpoint-*"))  # none was due
    due = tmp_path / "due"
    assert train_cli.main(train_argv(llama_dir, data_file, due, "--max_steps", "3", "--save_step", "2")) == 0
    assert sorted(p.name for p in due.glob("checkpoint-*")) == ["checkpoint-2"]


# --- help, suggestions, demo commands, summary numbers ---------------------------------------------------------------


@pytest.mark.parametrize("script", ["train", "evaluate", "generate"])
def test_help_shows_every_default_once(script):
    import argparse
    import importlib

    parser = importlib.import_module(f"peft_bayes.cli.{script}").build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._format_action(action)
        assert text.count("(default") <= 1 and "(default: None)" not in text, text
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            assert "(default" in text, text


def test_mistyped_names_get_the_nearest_suggested(capsys):
    from peft_bayes.tuners.catalogue import adapter_spec

    with pytest.raises(InputError, match=r"unknown --adapter_name 'lroa' \(did you mean 'lora'"):
        adapter_spec("lroa")
    with pytest.raises(SystemExit) as exc:
        evaluate.build_parser().parse_args(["--base_model", "m", "--choice_format", "clze"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice 'clze' (did you mean 'cloze'?)" in err and len(err.strip().splitlines()) == 1


def test_demo_prints_commands_a_shell_can_run(tmp_path):
    import subprocess

    from peft_bayes.cli.demo import ROOT, command, printable

    line = printable(command("train", ["--help"]))
    assert line.split()[0] in ("python", __import__("sys").executable)
    proc = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage: train.py" in proc.stdout


def test_summary_numbers_carry_no_float_noise():
    assert evaluate.rounded({"ece_percent": 7.9999999999999964, "x": [0.1 + 0.2, 3], "s": "a"}) == {
        "ece_percent": 8.0,
        "x": [0.3, 3],
        "s": "a",
    }
    assert evaluate.rounded(1 / 3) == pytest.approx(1 / 3, rel=2e-12)


def test_make_clean_cache_removes_the_converted_model_cache(tmp_path):
    import shutil
    import subprocess

    from peft_bayes.cli.demo import ROOT

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cache = tmp_path / "cache"
    (cache / "models" / "m").mkdir(parents=True)
    (cache / "models" / "m" / "model.safetensors").write_bytes(b"x")
    proc = subprocess.run(["make", "-s", "clean-cache", f"PEFT_BAYES_CACHE={cache}"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0 and not cache.exists()
