"""Laplace-LoRA's settings against this library's defaults on one trained LoRA: the curvature (the sampled ``mc``
Fisher, one label per example, against the exact GGN of the categorical, Laplace-LoRA's ``AsdlGGN``) and the GLM
link (the closed-form pairwise probit against Laplace-LoRA's Monte-Carlo average of the softmax over 100,000 draws
of the correlated option scores), with ACC / ECE / NLL / Brier on a test set and the fit's seconds.

Run (CPU or CUDA; a LoRA adapter trained by train.py and its training slice, e.g. from
``bench/real_model_calibration.py``'s work folder; the real model needs ``make install-real``)::

    python bench/bench_laplace_settings.py --adapter WORK/seed0/train-lora \\
        --fit_data WORK/data/ARC-Easy_train_seeded0_32.json \\
        --data_path ../shared/data/llm-adapters/dataset/ARC-Easy/test.json --n 100

Every fit uses the whole ``--fit_data`` file, K-FAC, and the scalar prior precision of the marginal likelihood
(the library's and Laplace-LoRA's). The ``mc`` Fisher is fitted once per ``--seeds`` entry (its label samples),
the ``exact`` one once (it is deterministic). For each fit the GLM moments of every test question are computed
once and both links applied to them: the MC link with ``--draws`` draws (seeded). Rows with several seeds give
mean ± std. Outputs under ``--output_dir`` (default ``bench/results``): ``laplace_settings.json`` and
``laplace_settings.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_outputs import write_results

from peft_bayes.arguments import comma_list, positive_ints
from peft_bayes.evaluation.calibration import choice_metrics
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.models import LoadOptions, load_inference_model, load_prompter, tokenizer_source
from peft_bayes.posterior import Laplace, LaplaceOptions
from peft_bayes.posterior.laplace import glm_probabilities

ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    ("ACC %", "accuracy_percent"),
    ("ECE %", "ece_percent"),
    ("NLL", "nll_nats"),
    ("Brier", "brier_sum_over_classes"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder saved by train.py")
    p.add_argument("--fit_data", required=True, help="the adapter's training questions (LLM-Adapters schema)")
    p.add_argument("--data_path", required=True, help="multiple-choice test file")
    p.add_argument("--n", type=int, default=100, help="test questions (the first N)")
    p.add_argument("--prompt_template", default="alpaca_short")
    p.add_argument("--choice_format", default="cloze", choices=["label", "cloze", "letter"])
    p.add_argument("--fishers", type=comma_list, default="mc,exact", help="curvatures to fit (mc, exact, empirical)")
    p.add_argument("--seeds", type=positive_ints, default="1,2,3", help="label-sampling seeds of the mc Fisher")
    p.add_argument("--draws", type=int, default=100_000, help="the MC link's draws of the option scores")
    p.add_argument("--batch_size", type=int, default=4, help="examples per differentiable batch")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    bad = [f for f in args.fishers if f not in ("mc", "exact", "empirical")]
    if bad:
        p.error(f"--fishers: unknown curvature {bad[0]!r} (mc, exact, empirical)")
    if args.n < 1 or args.draws < 1 or args.batch_size < 1:
        p.error("--n, --draws and --batch_size must be positive")
    return args


def evaluate_fit(laplace: Laplace, test: PairScorer, golds: list[int], draws: int, batch_size: int) -> dict:
    """Metrics of both links from one pass of GLM moments over the test questions."""
    probs = {"probit": [None] * test.n_examples, "mc": [None] * test.n_examples}
    generator = torch.Generator().manual_seed(0)
    for batch in test.batches(batch_size):
        f, (cov,) = laplace.glm_moments(batch)
        linked = {"probit": glm_probabilities(f, cov, "probit")}
        linked["mc"] = glm_probabilities(f, cov, "mc", draws, generator)
        for row, index in enumerate(batch.index.tolist()):
            valid = torch.isfinite(f[row])
            for link, p in linked.items():
                probs[link][index] = p[row][valid]
    return {link: choice_metrics(p, golds) for link, p in probs.items()}


def run(args: argparse.Namespace) -> list[dict]:
    model, tokenizer = load_inference_model(args.base_model, args.adapter, LoadOptions())
    prompter = load_prompter(args.prompt_template, tokenizer_source(args.base_model, args.adapter))
    fit = load_eval_set("fit", args.fit_data, None, prompter, args.choice_format)
    data = load_eval_set("test", args.data_path, args.n, prompter, args.choice_format)
    fit_scorer = PairScorer(model, tokenizer, fit.pairs, args.batch_size, labels=fit.golds)
    test = PairScorer(model, tokenizer, data.pairs, args.batch_size, labels=data.golds)
    runs = []
    for fisher in args.fishers:
        for seed in args.seeds if fisher == "mc" else args.seeds[:1]:
            laplace = Laplace(model, LaplaceOptions(fisher=fisher, seed=seed, grad_batch_size=args.batch_size))
            t0 = time.perf_counter()
            laplace.fit(fit_scorer.batches(args.batch_size))
            fit_seconds = time.perf_counter() - t0
            metrics = evaluate_fit(laplace, test, data.golds, args.draws, args.batch_size)
            prior = float(laplace.prior_precision.reshape(-1)[0])
            print(f"{fisher} seed {seed}: fit {fit_seconds:.0f} s, prior {prior:.3g}, {metrics}", flush=True)
            for link, m in metrics.items():
                runs.append({"fisher": fisher, "seed": seed, "link": link, "fit_seconds": fit_seconds, **m})
                runs[-1]["prior_precision"] = prior
    return runs


def _cell(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: list[dict], draws: int) -> str:
    lines = ["| curvature | link | fits | " + " | ".join(c for c, _ in METRICS) + " | fit s |", "|---" * 8 + "|"]
    for fisher in dict.fromkeys(r["fisher"] for r in runs):
        for link in ("probit", "mc"):
            rows = [r for r in runs if r["fisher"] == fisher and r["link"] == link]
            name = "pairwise probit" if link == "probit" else f"MC, {draws:,} draws"
            cells = [
                _cell([r[key] for r in rows], 4 if key in ("nll_nats", "brier_sum_over_classes") else 2)
                for _, key in METRICS
            ]
            fit = _cell([r["fit_seconds"] for r in rows], 0)
            lines.append(f"| {fisher} | {name} | {len(rows)} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = run(args)
    text = (
        f"Laplace (K-FAC, all adapter weights, marglik prior) on {args.base_model} + {args.adapter}: fitted on "
        f"{os.path.basename(args.fit_data)}, tested on the first {runs[0]['n']} questions of {args.data_path} "
        f"({args.choice_format})\n\n" + table(runs, args.draws)
    )
    print("\n" + text)
    write_results(args.output_dir, "laplace_settings", vars(args), runs, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
