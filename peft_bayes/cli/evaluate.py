"""evaluate.py: evaluation of a base model or an adapter on math and commonsense test sets, with calibration.

Math sets are answered by batched greedy generation (sorted by prompt length, left padding, attention mask, KV
cache); with ``--samples N`` each posterior sample generates and the answers are put to a majority vote.
Multiple-choice sets are scored by the likelihood of each answer option (no generation), averaged over posterior
samples. Per-example records and a summary are written as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from peft_bayes.arguments import ArgumentParser
from peft_bayes.cli.common import (
    add_model_flags,
    add_recorded_flags,
    apply_recorded_settings,
    quiet_progress_bars_off_terminal,
)
from peft_bayes.cli.posterior_flags import add_posterior_flags, check_posterior_flags, resolve_posterior
from peft_bayes.errors import InputError
from peft_bayes.evaluation import calibration, predictive, votes
from peft_bayes.evaluation.batching import generate_batched, make_batches
from peft_bayes.evaluation.choice_scoring import ChoiceOptions
from peft_bayes.evaluation.datasets import EvalSet, load_eval_set
from peft_bayes.io import peak_memory, progress_printer, write_json_atomic
from peft_bayes.models import LoadOptions, check_base_model, load_inference_model, load_prompter, tokenizer_source
from peft_bayes.options import add_option_flags, options_from_args
from peft_bayes.posterior import posterior_class
from peft_bayes.posterior.bayeslora import EvalDraw
from peft_bayes.tuners import catalogue as adapters

__all__ = ["build_parser", "generate_batched", "load_eval_model", "main", "make_batches", "resolve_dataset"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    add_model_flags(p, "adapter folder saved by train.py (omit to evaluate the base model)")
    p.add_argument("--dataset", default=None, help="test set name, e.g. SVAMP, gsm8k, AQuA, boolq, ARC-Easy")
    p.add_argument(
        "--data_dir",
        default=os.environ.get("PEFT_BAYES_DATA_DIR", "dataset"),
        help="folder holding <dataset>/test.json (LLM-Adapters' layout); env PEFT_BAYES_DATA_DIR",
    )
    p.add_argument("--data_path", default=None, help="any JSON file in the schema (overrides --data_dir)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--output_dir", default="eval_results")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    b = p.add_argument_group("Bayesian evaluation and calibration")
    b.add_argument(
        "--samples",
        type=_samples_flag,
        default="auto",
        help="posterior samples; auto = 10 for an adapter with a posterior (bayeslora), else 0 (one deterministic "
        "pass with the posterior mean)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the posterior sample draws")
    b.add_argument(
        "--bayes_eval_draw",
        default="forward",
        choices=EvalDraw.values(),
        help="BayesLoRA / TFB samples of multiple-choice scoring: forward = a fresh noise draw and flipout signs on "
        "every forward pass (BLoB); pass = one weight sample held for the whole pass over the data (generation "
        "always holds one sample per pass)",
    )
    add_option_flags(b, ChoiceOptions, defaults=True)
    b.add_argument("--ood_dataset", default=None, help="multiple-choice OOD test set (resolved via --data_dir)")
    b.add_argument("--ood_data_path", default=None, help="OOD test file (overrides --data_dir for the OOD set)")
    add_posterior_flags(p, training=False)
    add_recorded_flags(p)
    return p


def _samples_flag(value: str) -> int | None:
    """``--samples``: a number of posterior samples, or ``auto`` (None: decided once the model is loaded)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of posterior samples or auto, got {value!r}") from None


def resolve_dataset(args, ood: bool = False) -> tuple[str, str]:
    """(name, path) of the test file from --dataset / --data_dir / --data_path (the --ood_* flags with ``ood``)."""
    dataset, data_path = (args.ood_dataset, args.ood_data_path) if ood else (args.dataset, args.data_path)
    flag = "--ood_" if ood else "--"
    if data_path:
        return dataset or os.path.splitext(os.path.basename(data_path))[0], data_path
    if not dataset:
        raise InputError(f"give {flag}dataset NAME (with --data_dir) or {flag}data_path FILE")
    path = os.path.join(args.data_dir, dataset, "test.json")
    if not os.path.isfile(path):
        raise InputError(f"{flag}dataset {dataset}: {path} not found (set --data_dir or {flag}data_path)")
    return dataset, path


def load_eval_model(args):
    """Base model (+ adapter) in eval mode, and a left-padding tokenizer (the adapter's if it saved one); a
    posterior over member adapters (an ensemble) loads them itself."""
    if args.adapter_name:
        if not args.adapter:
            raise InputError("--adapter_name needs --adapter (the adapter folder to check)")
        adapters.check_saved_adapter(args.adapter_name, args.adapter)
    members = posterior_class(getattr(args, "posterior", None) or "map").member_adapters
    load = options_from_args(LoadOptions, args)
    return load_inference_model(args.base_model, None if members else args.adapter, load)


def check_args(args) -> None:
    args.recorded_note = apply_recorded_settings(args, {"prompt_template": "alpaca", "choice_format": "label"})
    if args.batch_size <= 0 or args.max_new_tokens <= 0 or args.num_beams <= 0:
        raise InputError("--batch_size, --max_new_tokens and --num_beams must be positive")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be a positive number of examples, got {args.limit}")
    if args.samples is not None and args.samples < 0:
        raise InputError(f"--samples must be 0 (deterministic) or a positive number of samples, got {args.samples}")
    args.posterior = posterior_class(args.posterior).name  # an alias (train.py's none) becomes the table's name
    check_posterior_flags(args)


def _progress(args, name: str):
    return progress_printer(name, args.quiet)


def _choice_probs(model, tokenizer, data: EvalSet, args, samples: int, label: str) -> list:
    return predictive.averaged_pair_probs(
        model,
        tokenizer,
        data.pairs,
        args.batch_size,
        samples,
        args.seed,
        _progress(args, label),
        args.choice_scoring,
        args.choice_norm,
        args.posterior_object,
        data.golds,
    )


def evaluate_choice(model, tokenizer, data: EvalSet, args, samples: int) -> tuple[list[dict], dict, list]:
    """Option-likelihood scoring: (rows, metrics, averaged probabilities)."""
    probs = _choice_probs(model, tokenizer, data, args, samples, data.name)
    rows = calibration.choice_rows(data.records, data.prompts, data.options, data.golds, probs, data.texts)
    metrics = {"scoring": "option-likelihood", "choice_format": args.choice_format}
    if args.choice_format == "label":
        metrics["choice_prefix"] = args.choice_prefix
    metrics.update({"choice_norm": args.choice_norm, "choice_scoring": args.choice_scoring})
    metrics.update(calibration.choice_metrics(probs, data.golds))
    return rows, metrics, probs


def evaluate_generation(model, tokenizer, data: EvalSet, args, samples: int, prompter) -> tuple[list[dict], dict]:
    """Greedy generation per posterior sample and a majority vote: (rows, metrics)."""
    gen = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    passes = predictive.sampled_generations(
        model, tokenizer, data.prompts, samples, args.seed, gen, _progress(args, data.name), args.posterior_object
    )
    responses = [[prompter.get_response(g) for g in gens] for gens in passes]
    rows = votes.vote_rows(data.records, data.prompts, responses, data.task)
    metrics = {"scoring": "generation-vote", **gen}
    metrics.update(votes.vote_metrics([r["confidence"] for r in rows], [r["correct"] for r in rows]))
    return rows, metrics


def evaluate_ood(model, tokenizer, data: EvalSet, ood: EvalSet, args, samples: int, id_probs) -> tuple[list, dict]:
    """Scores the OOD set like the test set; (rows, metrics) with the entropy AUROC."""
    probs = _choice_probs(model, tokenizer, ood, args, samples, f"{ood.name} (OOD)")
    rows = calibration.choice_rows(ood.records, ood.prompts, ood.options, ood.golds, probs, ood.texts)
    metrics = {"ood_dataset": ood.name, "ood_data_path": ood.path, **calibration.ood_metrics(id_probs, probs)}
    metrics["ood_accuracy_percent"] = 100 * sum(r["correct"] for r in rows) / len(rows)
    return rows, metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_progress_bars_off_terminal()
    check_args(args)
    check_base_model(args.base_model, args.trust_remote_code)  # a missing model is named before the data is read
    prompter = load_prompter(
        args.prompt_template, tokenizer_source(args.base_model, args.adapter), args.trust_remote_code
    )  # chat: tokenizer
    data = load_eval_set(*resolve_dataset(args), args.limit, prompter, args.choice_format, args.choice_prefix)
    ood = None
    if args.ood_dataset or args.ood_data_path:
        ood = load_eval_set(
            *resolve_dataset(args, ood=True), args.limit, prompter, args.choice_format, args.choice_prefix
        )
        if data.task.kind != "choice" or ood.task.kind != "choice":
            raise InputError(
                f"--ood_dataset needs multiple-choice test sets (option scoring); {data.name} is a "
                f"{data.task.kind!r} task and {ood.name} a {ood.task.kind!r} task"
            )
    if args.samples and not posterior_class(args.posterior).may_sample(args):  # fail before loading the model
        predictive.resolve_samples(args.samples, None)
    model, tokenizer = load_eval_model(args)
    args.posterior_object = resolve_posterior(args, model, tokenizer, prompter, data.task.kind == "choice")
    if hasattr(args.posterior_object, "eval_draw"):  # BayesLoRA (and TFB): what one evaluation sample draws
        # a generated answer keeps one weight sample from its first token to its last
        args.posterior_object.eval_draw = args.bayes_eval_draw if data.task.kind == "choice" else "pass"
    model = args.posterior_object.model  # an ensemble's members join the model as named adapters
    samples = predictive.resolve_samples(args.samples, model, args.posterior_object)
    if args.recorded_note:  # every check passed: the settings taken from the adapter, in one line
        print(args.recorded_note, file=sys.stderr)
    t0 = time.perf_counter()
    probs, ood_rows = None, None
    if data.task.kind == "choice":
        rows, metrics, probs = evaluate_choice(model, tokenizer, data, args, samples)
        if ood is not None:
            ood_rows, ood_summary = evaluate_ood(model, tokenizer, data, ood, args, samples, probs)
            metrics.update(ood_summary)
    else:
        rows, metrics = evaluate_generation(model, tokenizer, data, args, samples, prompter)
    summary = _summary(args, data, rows, time.perf_counter() - t0, samples, metrics)
    write_outputs(args.output_dir, data, summary, rows, probs, ood_rows)
    print_summary(summary)
    return 0


def write_outputs(output_dir: str, data: EvalSet, summary: dict, rows, probs=None, ood_rows=None) -> None:
    """Predictions (and OOD predictions), the reliability diagram of a multiple-choice set, then the summary;
    each file is written to a temporary name and renamed, the summary last."""
    stem = os.path.join(output_dir, data.name)
    if ood_rows is not None:
        write_json_atomic(f"{stem}_ood_{summary['ood_dataset']}_predictions.json", ood_rows)
    write_json_atomic(stem + "_predictions.json", rows)
    if probs is not None:
        title = f"{data.name}, {summary['samples'] or 'no'} posterior samples"
        png = calibration.write_reliability(probs, data.golds, stem + "_reliability.png", title)
        summary["reliability_diagram"] = png
    write_json_atomic(stem + "_summary.json", rounded(summary))


def rounded(obj, digits: int = 12):
    """``obj`` with every float cut to ``digits`` significant digits: sums of float64 terms carry noise in their last
    bits (an ECE of 8 % was written as 7.9999999999999964), far below any difference that means something."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def _summary(args, data: EvalSet, rows: list[dict], wall: float, samples: int, metrics: dict) -> dict:
    n_correct = sum(r["correct"] for r in rows)
    n_examples = len(rows) + metrics.get("ood_n", 0)
    return {
        "dataset": data.name,
        "data_path": data.path,
        "base_model": args.base_model,
        "adapter": args.adapter,
        "n": len(rows),
        "correct": n_correct,
        "accuracy": n_correct / len(rows),
        "accuracy_unit": "fraction",
        "samples": samples,
        "seed": args.seed,
        **args.posterior_object.summary(),
        **metrics,
        "wall_time_s": round(wall, 3),
        "examples_per_s": round(n_examples / wall, 3),
        "batch_size": args.batch_size,
        **peak_memory(),
    }


def print_summary(s: dict) -> None:
    """A Markdown table: ACC / ECE / NLL / Brier for multiple choice, ACC / ECE / AUROC for generated answers."""

    def num(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    cols = {"dataset": s["dataset"], "n": s["n"], "posterior": s.get("posterior", "map"), "samples": s["samples"]}
    cols["ACC (%)"] = f"{s['accuracy_percent']:.2f}"
    cols["ECE (%)"] = f"{s['ece_percent']:.2f}"
    if s["scoring"] == "option-likelihood":
        cols.update({"NLL": num(s["nll_nats"]), "Brier": num(s["brier_sum_over_classes"])})
        if "ood_auroc" in s:
            cols[f"OOD AUROC ({s['ood_dataset']})"] = num(s["ood_auroc"])
    else:
        cols["AUROC"] = num(s["auroc"])
    cols.update({"wall time (s)": f"{s['wall_time_s']:.1f}", "examples/s": f"{s['examples_per_s']:.2f}"})
    header, values = " | ".join(cols), " | ".join(map(str, cols.values()))
    print(f"\n| {header} |\n" + "|---" * len(cols) + f"|\n| {values} |")
