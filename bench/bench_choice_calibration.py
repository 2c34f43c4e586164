"""Accuracy and calibration of LoRA vs Bayesian LoRA (BLoB) on a multiple-choice task, end to end through the scripts.

Run (CPU, a few minutes; nothing downloaded)::

    python bench/bench_choice_calibration.py                    # defaults below
    python bench/bench_choice_calibration.py --epochs 10 --samples 10 --output_dir /tmp/calib

What it does, every step through the repo-root scripts exactly as a user runs them:

1. builds the demo's tiny LLaMA-shaped model (random, frozen; ``peft_bayes.tiny``) and writes a synthetic
   multiple-choice set in LLM-Adapters' commonsense format (``peft_bayes.data.synthetic.write_choice_data``:
   arithmetic word problems or "which number is the largest", ``Answer1: ... Answer format: answer1/.../answer4``);
2. ``train.py`` fine-tunes LoRA and BayesLoRA with the same rank, targets, learning rate, epochs and seed (BayesLoRA
   adds BLoB's KL term with its defaults: prior 0.2, eps 0.05, flipout, the ``blob`` KL schedule);
3. ``evaluate.py`` scores the held-out set by option likelihood: LoRA once (deterministic), BayesLoRA with
   ``--samples N`` (probabilities averaged over N posterior samples) and with ``--samples 0`` (the posterior mean).

Outputs under ``--output_dir`` (default ``bench/results``): ``choice_calibration.json`` (every summary, the commands,
settings) and ``choice_calibration.md`` (ACC / ECE in percent, NLL in nats, Brier; also printed). The numbers depend
on the seed and the tiny model: they show the pipeline and the direction of the effect, not a paper's result.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "seed": 0, "initializer_range": 0.125}
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BAYES_FLAGS = ["--prior_std", "0.2", "--bayes_eps", "0.05", "--kl_schedule", "blob"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_train", type=int, default=800, help="training questions")
    p.add_argument("--n_test", type=int, default=200, help="held-out questions")
    p.add_argument("--n_options", type=int, default=4, help="options per question (2-9)")
    p.add_argument("--kind", default="arithmetic", choices=["arithmetic", "compare"], help="question type")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl_weight", type=float, default=1.0, help="BayesLoRA: factor on KL / N (BLoB: 1)")
    p.add_argument("--samples", type=int, default=10, help="posterior samples of the Bayesian evaluation")
    p.add_argument("--seed", type=int, default=0, help="data, training and sampling seed")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work_dir", default=None, help="keep the model, data and adapters here (default: a temp dir)")
    return p.parse_args(argv)


def run_script(name: str, args: list[str], log: list[str]) -> None:
    """Runs ``<repo>/<name>.py args``; the command line is printed and kept for the JSON."""
    line = f"python {name}.py " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {line}", flush=True)
    log.append(line)
    subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *args], check=True, cwd=ROOT)


def train_flags(args, data: Path, model: Path, out: Path, adapter: str) -> list[str]:
    flags = [
        "--base_model", str(model), "--data_path", str(data), "--output_dir", str(out), "--adapter_name", adapter,
        "--target_modules", TARGETS, "--lora_r", str(args.rank), "--lora_alpha", str(2 * args.rank),
        "--lora_dropout", "0.0", "--batch_size", "16", "--micro_batch_size", "16", "--num_epochs", str(args.epochs),
        "--learning_rate", str(args.lr), "--warmup_steps", "20", "--cutoff_len", "160", "--val_set_size", "0",
        "--save_step", "100000", "--logging_steps", "50", "--train_on_inputs", "false",
        "--prompt_template", "alpaca_short", "--seed", str(args.seed),
    ]  # fmt: skip
    return flags + ([*BAYES_FLAGS, "--kl_weight", str(args.kl_weight)] if adapter == "bayeslora" else [])


def evaluate(args, model: Path, adapter: Path, test: Path, out: Path, samples: int, log: list[str]) -> dict:
    run_script(
        "evaluate",
        [
            "--base_model",
            str(model),
            "--adapter",
            str(adapter),
            "--data_path",
            str(test),
            "--dataset",
            "choice",
            "--output_dir",
            str(out),
            "--samples",
            str(samples),
            "--seed",
            str(args.seed),
            "--batch_size",
            "32",
            "--prompt_template",
            "alpaca_short",
            "--quiet",
        ],
        log,
    )
    return json.loads((out / "choice_summary.json").read_text())


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = [
        "| adapter | posterior samples N | ACC (%) | ECE (%) | NLL (nats) | Brier (sum over classes) |",
        "|---|---|---|---|---|---|",
    ]
    for name, n, s in rows:
        lines.append(
            f"| {name} | {n} | {s['accuracy_percent']:.2f} | {s['ece_percent']:.2f} | {s['nll_nats']:.4f} "
            f"| {s['brier_sum_over_classes']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from peft_bayes.data.synthetic import write_choice_data
    from peft_bayes.tiny import build_tokenizer, save_tiny_model

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        train, test = map(
            Path,
            write_choice_data(
                str(work / "data"), args.n_train, args.n_test, seed=args.seed, n_options=args.n_options, kind=args.kind
            ),
        )
        model = Path(save_tiny_model(work / "model", "llama", tokenizer=build_tokenizer(), **MODEL))
        log: list[str] = []
        results = []
        for adapter in ("lora", "bayeslora"):
            out = work / adapter
            run_script("train", train_flags(args, train, model, out, adapter), log)
            for n in (args.samples, 0) if adapter == "bayeslora" else (0,):
                results.append((adapter, n, evaluate(args, model, out, test, work / f"eval-{adapter}-{n}", n, log)))
    md = table(results)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = Path(args.output_dir) / "choice_calibration"
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "work_dir")}
    record = {"settings": settings, "model": MODEL, "targets": TARGETS, "commands": log}
    record["results"] = [{"adapter": a, "samples": n, "summary": s} for a, n, s in results]
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
