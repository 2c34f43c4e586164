"""TFB's sigma search time: the previous path (differentiable batches of every option, bisection on log sigma) against
the fast path (the shared prompt once per example, interpolation), on one trained LoRA, in one run.

Run (CPU; a LoRA adapter trained by train.py, e.g. by ``bench/real_model_calibration.py``; the real model needs
``make install-real``)::

    python bench/bench_tfb_search.py --adapter WORK/seed0/train-lora --anchors WORK/data/ARC-Easy_train_seeded0_32.json
    python bench/bench_tfb_search.py --adapter A --anchors F --configs batches:bisection,scorer:interpolation

Every configuration ``anchors:search`` loads the base model and the adapter afresh (TFB consumes the model it
converts), then times ``bayesianize`` (the mean's pass, the conversion and the search) with the same criterion
(expected NLL, gold labels, ``--samples`` draws, epsilon, bounds, tolerance). ``batches`` is the previous anchor path
(every option its own row, ``--grad_batch_size`` examples per batch), ``scorer`` the evaluation's shared path
(``--batch_size``). The table gives each one's seconds, its ratio to the first configuration's, the evaluations and
the sigma found, whose ratio to the first's must stay within the tolerance. Outputs under ``--output_dir`` (default
``bench/results``): ``tfb_search.json`` and ``tfb_search.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from bench_outputs import write_results

from peft_bayes.arguments import comma_list
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.models import LoadOptions, load_inference_model, load_prompter, tokenizer_source
from peft_bayes.posterior.tfb import TfbOptions, bayesianize

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder saved by train.py")
    p.add_argument("--anchors", required=True, help="multiple-choice anchor file (LLM-Adapters schema)")
    p.add_argument("--limit", type=int, default=64, help="anchor questions (the first N)")
    p.add_argument("--prompt_template", default="alpaca_short")
    p.add_argument("--choice_format", default="cloze", choices=["label", "cloze", "letter"])
    p.add_argument("--configs", type=comma_list, default="batches:bisection,scorer:bisection,scorer:interpolation")
    p.add_argument("--batch_size", type=int, default=16, help="scorer anchors: examples per forward pass")
    p.add_argument("--grad_batch_size", type=int, default=4, help="batches anchors: examples per batch")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    for config in args.configs:
        anchors, _, search = config.partition(":")
        if anchors not in ("batches", "scorer") or search not in ("bisection", "interpolation", "halving"):
            p.error(f"--configs: {config!r} is not anchors:search (batches|scorer : bisection|interpolation|halving)")
    return args


def run(args: argparse.Namespace, config: str) -> dict:
    """One timed bayesianize on a freshly loaded model."""
    kind, _, search = config.partition(":")
    model, tokenizer = load_inference_model(args.base_model, args.adapter, LoadOptions())
    prompter = load_prompter(args.prompt_template, tokenizer_source(args.base_model, args.adapter))
    data = load_eval_set("anchors", args.anchors, args.limit, prompter, args.choice_format)
    scorer = PairScorer(model, tokenizer, data.pairs, args.batch_size, labels=data.golds)
    anchors = scorer if kind == "scorer" else list(scorer.batches(args.grad_batch_size))
    options = TfbOptions(
        epsilon=args.epsilon, samples=args.samples, search=search, tolerance=args.tolerance, seed=args.seed
    )
    _, result = bayesianize(model, anchors, options)
    print(
        f"{config}: sigma {result.sigma:.5g}, {result.n_evals} evaluations, {result.search_seconds:.1f} s", flush=True
    )
    return {"config": config, "anchors": len(data.pairs), **result.to_dict()}


def table(rows: list[dict], tolerance: float) -> str:
    first = rows[0]
    lines = ["| anchors:search | evaluations | sigma | sigma / first's | seconds | x first's time |", "|---" * 6 + "|"]
    for r in rows:
        ratio = r["sigma"] / first["sigma"]
        lines.append(
            f"| {r['config']} | {r['n_evals']} | {r['sigma']:.5g} | {ratio:.4f} | {r['search_seconds']:.1f} | "
            f"{r['search_seconds'] / first['search_seconds']:.3f} |"
        )
    same = all(abs(math.log(r["sigma"] / first["sigma"])) <= math.log1p(tolerance) for r in rows)
    lines.append(f"\nEvery sigma within the tolerance ({tolerance}) of the first's: {same}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = [run(args, config) for config in args.configs]
    text = (
        f"TFB sigma search on {args.base_model} + {args.adapter}: {rows[0]['anchors']} anchor questions of "
        f"{os.path.basename(args.anchors)} ({args.choice_format}), {args.samples} draws, epsilon {args.epsilon}\n\n"
        + table(rows, args.tolerance)
    )
    print("\n" + text)
    write_results(args.output_dir, "tfb_search", vars(args), rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
