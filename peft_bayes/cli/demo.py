"""``make demo``: the whole pipeline on a built-in default, on CPU, in a few minutes, with nothing downloaded.

1. builds a tiny LLaMA-shaped model and a byte-level BPE tokenizer (``peft_bayes.tiny``),
2. writes a synthetic set of arithmetic word problems (``peft_bayes.data.synthetic``),
3. runs ``train.py`` (LoRA) → ``evaluate.py`` → ``generate.py --instruction ...``, printing each command.

Usage: ``python -m peft_bayes.cli.demo [FOLDER]`` (default ``demo_run``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from peft_bayes.arguments import ArgumentParser
from peft_bayes.cli.common import quiet_progress_bars_off_terminal
from peft_bayes.data.synthetic import write_demo_data
from peft_bayes.tiny import build_tokenizer, save_tiny_model

# Settings chosen so the demo learns clearly within its time budget on 2 CPU cores (see the README).
# The base is random and frozen, so the LoRA update on every linear layer does all the learning; a wider
# initialisation (initializer_range 0.125 instead of 0.02) gives it random features strong enough to learn from.
MODEL = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "seed": 0, "initializer_range": 0.125}
DATA = {"n_train": 800, "n_test": 100, "seed": 0, "max_operand": 9}
TRAIN_FLAGS = [
    "--adapter_name", "lora", "--target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--batch_size", "16",
    "--micro_batch_size", "16", "--num_epochs", "25", "--learning_rate", "5e-3", "--warmup_steps", "20",
    "--cutoff_len", "96", "--val_set_size", "0", "--save_step", "100000", "--logging_steps", "125",
    "--train_on_inputs", "false", "--prompt_template", "alpaca_short",
]  # fmt: skip
EVAL_FLAGS = ["--batch_size", "32", "--max_new_tokens", "16", "--prompt_template", "alpaca_short", "--quiet"]
# Torch threads per step (OMP_NUM_THREADS, unless already set). The demo's matrix products are tiny: with torch's
# default of one thread per core, another job on a 2-core machine stalls every parallel op on a descheduled thread
# (training 20x slower beside one busy process). One thread trains ~1.4x slower on an idle machine but never
# stalls (the README has the measurements).
THREADS = "1"
ROOT = Path(__file__).resolve().parents[2]


def command(name: str, args: list[str]) -> list[str]:
    """The repo-root script ``name``.py when running from a checkout; otherwise the same entry point (``run_cli`` over
    ``peft_bayes.cli.<name>.main``) inline, since those modules have no ``__main__`` block of their own."""
    path = ROOT / f"{name}.py"
    if path.is_file():
        return [sys.executable, str(path), *args]
    code = f"import sys; from peft_bayes.cli.common import run_cli; from peft_bayes.cli.{name} import main; "
    return [sys.executable, "-c", code + "sys.exit(run_cli(main))", *args]


def printable(cmd: list[str]) -> str:
    """The command as one line a user can paste into a shell: ``python`` when that is this interpreter, paths under
    the working directory relative to it, every word shell-quoted."""
    words = list(cmd)
    on_path = shutil.which("python")
    if on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable):
        words[0] = "python"
    here = Path.cwd().resolve()
    for i, word in enumerate(words):
        path = Path(word)
        if path.is_absolute() and path.resolve().is_relative_to(here):
            words[i] = str(path.resolve().relative_to(here))
    return shlex.join(words)


def run(name: str, args: list[str]) -> None:
    cmd = command(name, args)
    print(f"\n$ {printable(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", THREADS)}
    subprocess.run(cmd, check=True, env=env)


def prepare(folder: Path) -> tuple[Path, Path, Path]:
    """Writes the tiny model (with tokenizer) and the train / test sets; returns their paths."""

    train_path, test_path = write_demo_data(str(folder / "data"), **DATA)
    tokenizer = build_tokenizer()  # its built-in corpus covers the template and the problems' vocabulary
    params = dict(MODEL)
    model_dir = save_tiny_model(folder / "model", params.pop("arch"), tokenizer=tokenizer, **params)
    return Path(model_dir), Path(train_path), Path(test_path)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m peft_bayes.cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="demo_run")
    args = parser.parse_args(argv)
    quiet_progress_bars_off_terminal()
    folder = Path(args.folder)
    t0 = time.perf_counter()
    model, train_data, test_data = prepare(folder)
    adapter, results = folder / "adapter", folder / "eval"
    run(
        "train",
        ["--base_model", str(model), "--data_path", str(train_data), "--output_dir", str(adapter), *TRAIN_FLAGS],
    )
    run(
        "evaluate",
        [
            "--base_model",
            str(model),
            "--adapter",
            str(adapter),
            "--data_path",
            str(test_data),
            "--dataset",
            "arithmetic",
            "--output_dir",
            str(results),
            *EVAL_FLAGS,
        ],
    )
    question = "Mia has 4 apples. She buys 3 more apples. How many apples does Mia have now?"
    run(
        "generate",
        [
            "--base_model",
            str(model),
            "--adapter",
            str(adapter),
            "--instruction",
            question,
            "--temperature",
            "0",
            "--max_new_tokens",
            "24",
            "--prompt_template",
            "alpaca_short",
        ],
    )
    summary = json.loads((results / "arithmetic_summary.json").read_text())
    chance = 1 / (2 * DATA["max_operand"] + 1)
    took = time.perf_counter() - t0
    print(
        f"\ndemo: accuracy {100 * summary['accuracy']:.1f}% on {summary['n']} held-out problems "
        f"(chance about {100 * chance:.1f}%), total {took:.0f} s; outputs in {folder}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
