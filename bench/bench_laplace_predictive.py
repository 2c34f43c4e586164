"""Cost of Laplace's GLM predictive against the MAP's scoring of the same questions: seconds and peak memory, each
configuration in its own process, in one run.

Run (CPU or CUDA; a LoRA adapter trained by train.py with a Laplace posterior saved beside it, e.g. by
``bench/real_model_calibration.py`` or ``evaluate.py --posterior laplace --fit_data_path ...``; the real model needs
``make install-real``)::

    python bench/bench_laplace_predictive.py --adapter WORK/seed0/train-lora \\
        --data_path ../shared/data/llm-adapters/dataset/ARC-Easy/test.json --n 100
    python bench/bench_laplace_predictive.py --adapter A --data_path F --configs map,glm:1,glm:4,glm-mc:1

Configurations (``--configs``): ``map`` scores the questions as evaluate.py does without a posterior (the shared /
packed fast path, no gradients); ``glm:G`` is the Laplace posterior's GLM predictive (``option_probs``: the option
scores and their covariance J P⁻¹ Jᵀ, the pairwise probit) with ``G`` examples per differentiable batch
(``--laplace_glm_batch_size``); ``glm-mc:G`` the same with the Monte-Carlo link (``--mc_draws`` draws of the scores).
Each configuration runs in a fresh Python process that loads the base model and the adapter, builds the scorer, then
resets the kernel's resident high-water mark (``/proc/self/clear_refs``) so that ``peak MiB`` is the scoring's own
peak resident memory (the loaded model included, the loading's transient peak not); ``process peak MiB`` is the
whole process's. ``seconds`` times the scoring alone (Laplace: loading the saved factors and eigendecomposing them
included). Ratios are against ``map`` measured in the same run. ``max abs dp`` is the largest difference of any option
probability from the first configuration of the same kind (the batch size must not change the result). Outputs under
``--output_dir`` (default ``bench/results``): ``laplace_predictive.json`` and ``laplace_predictive.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_outputs import write_results

from peft_bayes.arguments import comma_list
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.io import peak_memory
from peft_bayes.models import LoadOptions, load_inference_model, load_prompter, tokenizer_source
from peft_bayes.posterior import load_posterior

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
RESULT = "RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder saved by train.py")
    p.add_argument("--posterior", default=None, help="saved Laplace folder (default: <adapter>/posterior/laplace)")
    p.add_argument("--data_path", required=True, help="multiple-choice test file (LLM-Adapters schema)")
    p.add_argument("--n", type=int, default=100, help="questions (the first N)")
    p.add_argument("--prompt_template", default="alpaca_short")
    p.add_argument("--choice_format", default="cloze", choices=["label", "cloze", "letter"])
    p.add_argument("--batch_size", type=int, default=16, help="the MAP's examples per forward pass (evaluate.py's)")
    p.add_argument("--configs", type=comma_list, default="map,glm:1,glm:4")
    p.add_argument("--mc_draws", type=int, default=100, help="glm-mc: draws of the option scores")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probs_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.posterior = args.posterior or os.path.join(args.adapter, "posterior", "laplace")
    if args.configs[0] != "map":
        p.error("--configs must start with map (the baseline of the ratios)")
    for config in args.configs[1:]:
        kind, _, size = config.partition(":")
        if kind not in ("glm", "glm-mc") or not size.isdigit() or int(size) < 1:
            p.error(f"--configs: {config!r} is not map, glm:G or glm-mc:G (G a positive batch size)")
    if args.n < 1 or args.batch_size < 1 or args.mc_draws < 1:
        p.error("--n, --batch_size and --mc_draws must be positive")
    return args


def _reset_peak() -> bool:
    """Resets this process's resident high-water mark (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: load, reset the peak, time the scoring."""
    model, tokenizer = load_inference_model(args.base_model, args.adapter, LoadOptions())
    prompter = load_prompter(args.prompt_template, tokenizer_source(args.base_model, args.adapter))
    data = load_eval_set("bench", args.data_path, args.n, prompter, args.choice_format)
    scorer = PairScorer(model, tokenizer, data.pairs, args.batch_size, labels=data.golds)
    loaded = peak_memory()["peak_rss_bytes"]
    reset = _reset_peak()
    t0 = time.perf_counter()
    if args.worker == "map":
        with torch.no_grad():
            probs = [s.softmax(-1) for s in scorer.scores()]
    else:
        kind, _, size = args.worker.partition(":")
        laplace = load_posterior(model, args.posterior)
        laplace.options.glm_batch_size = int(size)
        laplace.options.link = "mc" if kind == "glm-mc" else "probit"
        probs = laplace.option_probs(scorer, args.mc_draws if kind == "glm-mc" else 0, seed=0)
    seconds = time.perf_counter() - t0
    peak = peak_memory()["peak_rss_bytes"]
    torch.save([p.double() for p in probs], args.probs_out)
    return {
        "config": args.worker,
        "questions": len(data.pairs),
        "seconds": seconds,
        "peak_bytes": peak if reset else None,
        "process_peak_bytes": max(peak or 0, loaded or 0) or None,
    }


def run(argv: list[str], config: str, folder: str) -> tuple[dict, list[torch.Tensor]]:
    """Runs one configuration in a child process and reads its result and probabilities back."""
    probs_out = os.path.join(folder, config.replace(":", "_") + ".pt")
    cmd = [sys.executable, __file__, *argv, "--worker", config, "--probs_out", probs_out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"configuration {config} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][len(RESULT) :])
    print(f"{config}: {row['seconds']:.1f} s, peak {(row['peak_bytes'] or 0) / MiB:.0f} MiB", flush=True)
    return row, torch.load(probs_out)


def _ratio(value, base) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = "| config | seconds | x MAP | peak MiB | x MAP | process peak MiB | x MAP | max abs dp |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MiB:.0f}"
        diff = "-" if r.get("max_abs_dp") is None else f"{r['max_abs_dp']:.1e}"
        lines.append(
            f"| {r['config']} | {r['seconds']:.1f} | {_ratio(r['seconds'], base['seconds'])} | {peak} | "
            f"{_ratio(r['peak_bytes'], base['peak_bytes'])} | {(r['process_peak_bytes'] or 0) / MiB:.0f} | "
            f"{_ratio(r['process_peak_bytes'], base['process_peak_bytes'])} | {diff} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(worker(args)), flush=True)
        return 0
    rows, reference = [], {}  # the first configuration of each kind (glm, glm-mc)
    with tempfile.TemporaryDirectory() as folder:
        for config in args.configs:
            row, probs = run(sys.argv[1:] if argv is None else list(argv), config, folder)
            if config != "map":
                first = reference.setdefault(config.partition(":")[0], probs)
                row["max_abs_dp"] = max(float((p - q).abs().max()) for p, q in zip(probs, first))
            rows.append(row)
    text = (
        f"Laplace GLM predictive vs the MAP on {args.base_model} + {args.adapter}: {rows[0]['questions']} questions "
        f"of {args.data_path} ({args.choice_format}), torch threads {torch.get_num_threads()}\n\n" + table(rows)
    )
    print("\n" + text)
    write_results(args.output_dir, "laplace_predictive", vars(args), rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
