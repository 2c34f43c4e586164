"""generate.py: the streaming REPL, one-shot mode, generation flags, and the script run as a program."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_bayes.cli import evaluate
from peft_bayes.cli import generate as gen
from peft_bayes.cli.common import apply_recorded_settings
from peft_bayes.data import Prompter
from peft_bayes.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = [
    "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?",
    "Tell me about marbles.",
    "Lucy had 9 shells. She lost 4 shells.",
]


def _args(*argv):
    return gen.build_parser().parse_args(["--base_model", "unused", *map(str, argv)])


def _responder(base, *flags) -> gen.Responder:
    """The Responder generate.py's main builds for these flags."""
    args = gen.build_parser().parse_args(["--base_model", str(base), *map(str, flags)])
    apply_recorded_settings(args, {"prompt_template": "alpaca"})
    model, tokenizer = evaluate.load_eval_model(args)
    return gen.Responder(
        model, tokenizer, Prompter.from_name(args.prompt_template), gen.generation_kwargs(args), seed=args.seed
    )


def _one_shot(base, instruction, capsys, *flags) -> str:
    """What ``generate.py --instruction`` prints, minus the final newline."""
    capsys.readouterr()
    assert gen.main(["--base_model", str(base), "--instruction", instruction, *map(str, flags)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


class Recorder(io.StringIO):
    """A stdout that remembers every write."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


class FakeResponder:
    """Answers ``R(<instruction>)`` and records what it was asked."""

    def __init__(self):
        self.asked: list[str] = []

    def respond(self, instruction, input=None, out=None):
        self.asked.append(instruction)
        out.write(f"R({instruction})\n")
        return f"R({instruction})"


BANNER = "Type an instruction and press Enter (exit, quit or Ctrl-D to leave).\n"
PROMPT = "\n>>> "


# ---------------------------------------------------------------------------------------------------------------
# (a) the REPL
# ---------------------------------------------------------------------------------------------------------------


def test_repl_prints_the_one_shot_greedy_responses(llama_dir, capsys, monkeypatch):
    greedy = ["--temperature", "0", "--max_new_tokens", "8"]
    first, second = (_one_shot(llama_dir, text, capsys, *greedy) for text in INSTRUCTIONS[:2])
    assert first and second and first != second

    # main() without --instruction runs the REPL on stdin/stdout.
    lines = [INSTRUCTIONS[0], "", "   ", INSTRUCTIONS[1], "exit", INSTRUCTIONS[2]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert gen.main(["--base_model", str(llama_dir), *greedy]) == 0
    expected = BANNER + PROMPT + first + "\n" + PROMPT + PROMPT + PROMPT + second + "\n" + PROMPT + "\n"
    assert capsys.readouterr().out == expected  # blank lines skipped, nothing after "exit"


def test_repl_streams_the_response(llama_dir):
    responder = _responder(llama_dir, "--temperature", "0", "--max_new_tokens", "12")
    pieces = [p for p in responder.stream(INSTRUCTIONS[0]) if p]
    assert len(pieces) > 1, pieces  # token by token, not one block at the end

    out = Recorder()
    gen.repl(responder, stdin=io.StringIO(INSTRUCTIONS[0] + "\n"), stdout=out)
    assert out.getvalue() == BANNER + PROMPT + "".join(pieces) + "\n" + PROMPT + "\n"
    assert [w for w in out.writes if w] == [BANNER, PROMPT, *pieces, "\n", PROMPT, "\n"]


@pytest.mark.parametrize("word", ["exit", "quit", ":q", "EXIT", "  quit  "])
def test_repl_quits_on_quit_words(word):
    fake, out = FakeResponder(), io.StringIO()
    gen.repl(fake, stdin=io.StringIO(f"first\n{word}\nnever\n"), stdout=out)
    assert fake.asked == ["first"]
    assert out.getvalue() == BANNER + PROMPT + "R(first)\n" + PROMPT + "\n"


@pytest.mark.parametrize("text", ["", "one\ntwo", "one\ntwo\n"])
def test_repl_quits_on_eof(text):
    fake, out = FakeResponder(), io.StringIO()
    gen.repl(fake, stdin=io.StringIO(text), stdout=out)
    assert fake.asked == text.split()
    assert out.getvalue().endswith(PROMPT + "\n")


def test_repl_skips_blank_lines():
    fake = FakeResponder()
    gen.repl(fake, stdin=io.StringIO("\n   \n\t\n  padded  \n\n"), stdout=io.StringIO())
    assert fake.asked == ["padded"]


# ---------------------------------------------------------------------------------------------------------------
# (b) flags reach generate()
# ---------------------------------------------------------------------------------------------------------------


def test_generation_kwargs_greedy():
    kw = gen.generation_kwargs(_args("--temperature", "0", "--max_new_tokens", "7", "--repetition_penalty", "1.2"))
    assert kw == {"max_new_tokens": 7, "num_beams": 1, "do_sample": False, "repetition_penalty": 1.2}


def test_generation_kwargs_sampling():
    kw = gen.generation_kwargs(_args("--temperature", "0.7", "--top_p", "0.9", "--top_k", "5", "--num_beams", "3"))
    assert kw["do_sample"] is True and kw["num_beams"] == 3
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (0.7, 0.9, 5)


@pytest.mark.parametrize(
    "flags",
    [
        ["--top_p", "0"],
        ["--top_p", "1.5"],
        ["--temperature", "-0.1"],
        ["--top_k", "-1"],
        ["--num_beams", "0"],
        ["--max_new_tokens", "0"],
    ],
)
def test_invalid_generation_flags(flags, llama_dir):
    with pytest.raises(InputError):
        gen.generation_kwargs(_args(*flags))
    with pytest.raises(InputError):  # main refuses them before loading anything
        gen.main(["--base_model", str(llama_dir), "--instruction", "hi", *flags])


def test_seed_reproduces_and_different_seeds_differ(llama_dir, capsys):
    def sample(text, seed):
        flags = ["--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--max_new_tokens", "6", "--seed", seed]
        return _one_shot(llama_dir, text, capsys, *flags)

    first = [sample(text, 1) for text in INSTRUCTIONS]
    assert [sample(text, 1) for text in INSTRUCTIONS] == first
    assert [sample(text, 2) for text in INSTRUCTIONS] != first


@pytest.fixture
def generate_calls(monkeypatch):
    """Records (kwargs, prompt length, output ids) of every ``model.generate`` made by generate.py's model."""
    calls = []
    real = evaluate.load_eval_model

    def load(args):
        model, tokenizer = real(args)
        inner = model.generate

        def generate(*a, **kw):
            out = inner(*a, **kw)
            calls.append((kw, kw["input_ids"].shape[1], out, tokenizer))
            return out

        model.generate = generate
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_eval_model", load)
    return calls


def test_max_new_tokens_caps_the_response(llama_dir, capsys, generate_calls):
    text = _one_shot(llama_dir, INSTRUCTIONS[0], capsys, "--temperature", "0", "--max_new_tokens", "3")
    ((kw, n_prompt, out, tok),) = generate_calls
    assert kw["max_new_tokens"] == 3 and "streamer" in kw
    new = out[0, n_prompt:]
    assert 1 <= len(new) <= 3
    assert text == tok.decode(new, skip_special_tokens=True)


def test_beam_search_prints_the_complete_response(llama_dir, capsys, generate_calls):
    text = _one_shot(
        llama_dir, INSTRUCTIONS[0], capsys, "--temperature", "0", "--num_beams", "2", "--max_new_tokens", "5"
    )
    ((kw, n_prompt, out, tok),) = generate_calls
    assert kw["num_beams"] == 2 and "streamer" not in kw  # the non-streaming branch
    assert text and text == tok.decode(out[0, n_prompt:], skip_special_tokens=True)


def test_beam_search_yields_one_piece(llama_dir):
    responder = _responder(llama_dir, "--temperature", "0", "--num_beams", "2", "--max_new_tokens", "5")
    pieces = list(responder.stream(INSTRUCTIONS[1]))
    assert len(pieces) == 1 and pieces[0]
    enc = responder.tokenizer(responder.prompter.generate_prompt(INSTRUCTIONS[1]), return_tensors="pt")
    with torch.no_grad():
        out = responder.model.generate(**enc, num_beams=2, do_sample=False, max_new_tokens=5)
    assert pieces[0] == responder.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# (c) the script as a program
# ---------------------------------------------------------------------------------------------------------------


def _quiet_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",  # no "Loading weights" bar on stderr
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def script_runs(llama_dir):
    """Both subprocess runs, started together (each pays the import time; two cores run them side by side)."""
    base = [sys.executable, str(ROOT / "generate.py"), "--base_model", str(llama_dir)]
    commands = {
        "one_shot": [*base, "--instruction", INSTRUCTIONS[0], "--temperature", "0", "--max_new_tokens", "4"],
        "ui": [*base, "--ui", "--temperature", "0", "--max_new_tokens", "4"],
    }
    if importlib.util.find_spec("gradio") is not None:
        del commands["ui"]
    procs = {
        name: subprocess.Popen(
            cmd, cwd=ROOT, env=_quiet_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, cmd in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out.decode(), err.decode())
    return results


def test_script_one_shot(script_runs, llama_dir, capsys):
    rc, out, err = script_runs["one_shot"]
    assert rc == 0, err
    # Same text as the in-process one-shot run.
    assert out == _one_shot(llama_dir, INSTRUCTIONS[0], capsys, "--temperature", "0", "--max_new_tokens", "4") + "\n"


@pytest.mark.skipif(importlib.util.find_spec("gradio") is not None, reason="gradio is installed here")
def test_script_ui_without_gradio(script_runs):
    rc, out, err = script_runs["ui"]
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "gradio" in lines[0], err
    assert "Traceback" not in err
