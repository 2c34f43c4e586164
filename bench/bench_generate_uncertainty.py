"""generate.py's uncertainty on a real model: what it costs, and whether its epistemic score means something.

Two measurements of one posterior (``--posterior`` and the adapter flags, as generate.py takes them):

- ``cost``: generating one answer of ``--answer_tokens`` tokens (greedy, forced to that length) against the
  token-level pass over it (the answer teacher-forced under N draws, one batched forward) and the N sampled answers
  (one batched ``generate``, against N ``generate`` calls one draw at a time); the median of ``--repeats`` runs.
- ``auroc``: ``--n`` questions of the task the adapter was trained on (in-distribution) and ``--n`` of another
  (out-of-distribution); each answer's epistemic score (mean mutual information per token, its sum, and the
  disagreement 1 − k/N of the sampled answers) and the AUROC of separating the two sets by it.

Each run adds its row (keyed by ``--label``) to ``<output_dir>/generate_uncertainty_<mode>.{md,json}``:

    python bench/bench_generate_uncertainty.py --mode auroc --label swag --base_model smollm2-135m \\
        --adapter ADAPTER --posterior swag --samples 8 --prompt_template alpaca_short
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_outputs import ROOT, machine_info

from peft_bayes.cli import evaluate
from peft_bayes.cli import generate as gen
from peft_bayes.errors import InputError
from peft_bayes.io import write_json_atomic, write_text_atomic
from peft_bayes.metrics import auroc
from peft_bayes.models import load_prompter, tokenizer_source

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "llm-adapters" / "dataset"
QUESTION = "Which is a source of light energy? Answer with the option's text.\n\nAnswer1: a rock Answer2: the Sun"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["cost", "auroc"], required=True)
    p.add_argument("--label", required=True, help="the row's name in the table (e.g. the posterior)")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--answer_tokens", type=int, default=64, help="cost: the answer's length")
    p.add_argument("--repeats", type=int, default=3, help="cost: runs per measurement (the median is reported)")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA))
    p.add_argument("--id_task", default="ARC-Easy")
    p.add_argument("--ood_task", default="gsm8k")
    p.add_argument("--n", type=int, default=40, help="auroc: questions per set (the first N of each test.json)")
    return p.parse_known_args(argv)


def load(gen_argv: list[str]):
    """generate.py's model, tokenizer, prompt template and analyzer for these generate.py flags."""
    args = gen.build_parser().parse_args(gen_argv)
    gen.apply_recorded_settings(args, {"prompt_template": "alpaca"})
    kwargs = gen.generation_kwargs(args)
    gen._check_uncertainty_flags(args)
    prompter = load_prompter(args.prompt_template, tokenizer_source(args.base_model, args.adapter), False)
    model, tokenizer = evaluate.load_eval_model(args)
    analyzer = gen._analyzer(args, model, tokenizer, prompter, kwargs)
    return analyzer, tokenizer, prompter


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_cost(analyzer, tokenizer, prompter, opts) -> dict:
    """Seconds of: the main answer's generation, the token-level pass, the sampled answers batched and one by one."""
    model, n = analyzer.posterior.model, analyzer.samples
    ids = tokenizer(prompter.generate_prompt(QUESTION), return_tensors="pt")["input_ids"]
    fixed = {"max_new_tokens": opts.answer_tokens, "min_new_tokens": opts.answer_tokens, "do_sample": False,
             "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    with torch.inference_mode(), gen.main_context(analyzer.posterior):
        answer = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **fixed)[0, ids.shape[1] :]
    draws = analyzer.draws  # read off the posterior once (not timed: the same draws serve every answer)
    full = torch.cat([ids, answer.view(1, -1)], dim=1)
    out = {"samples": n, "batched": draws.batched, "answer_tokens": len(answer), "prompt_tokens": ids.shape[1]}

    def generate_main():
        with torch.inference_mode(), gen.main_context(analyzer.posterior):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **fixed)

    out["generate_s"] = _median_seconds(generate_main, opts.repeats)
    out["token_pass_s"] = _median_seconds(lambda: draws.logits(full, len(answer)), opts.repeats)
    out["samples_batched_s"] = _median_seconds(lambda: draws.generate(ids, **fixed), opts.repeats)
    batched = draws.batched
    draws.batched = False  # the same draws, one generate call each
    out["samples_one_by_one_s"] = _median_seconds(lambda: draws.generate(ids, **fixed), opts.repeats)
    draws.batched = batched
    out["token_pass / generate"] = out["token_pass_s"] / out["generate_s"]
    out["batched / one by one"] = out["samples_batched_s"] / out["samples_one_by_one_s"]
    return out


def _questions(opts, task: str) -> list[dict]:
    records = json.loads((Path(opts.data_dir) / task / "test.json").read_text(encoding="utf-8"))
    return records[: opts.n]


def measure_auroc(analyzer, tokenizer, prompter, opts) -> dict:
    """Epistemic scores of in- and out-of-distribution answers and the AUROC of telling them apart."""
    model, scores = analyzer.posterior.model, {"id": [], "ood": []}
    sets = [("id", _questions(opts, opts.id_task)), ("ood", _questions(opts, opts.ood_task))]
    total, done, t0 = 2 * opts.n, 0, time.perf_counter()
    for key, records in sets:
        for rec in records:
            ids = tokenizer(prompter.generate_prompt(rec["instruction"], rec.get("input") or None),
                            return_tensors="pt")["input_ids"]  # fmt: skip
            with torch.inference_mode(), gen.main_context(analyzer.posterior):
                kw = {**analyzer.gen_kwargs, "attention_mask": torch.ones_like(ids)}
                answer = model.generate(input_ids=ids, **kw)[0, ids.shape[1] :]
            result = analyzer.analyse(ids, answer)
            agree = result.agreement
            scores[key].append({"mi_mean": result.means["mutual_information"],
                                "mi_sum": result.totals["mutual_information"],
                                "disagreement": 1 - agree["agree"] / agree["n"] if agree else 0.0,
                                "entropy_mean": result.means["predictive_entropy"]})  # fmt: skip
            done += 1
            left = (time.perf_counter() - t0) / done * (total - done)
            print(f"\r{done}/{total} answers scored, about {left / 60:.1f} min left", end="", file=sys.stderr)
    print(file=sys.stderr)
    out = {"samples": analyzer.samples, "batched": analyzer.draws.batched, "n": opts.n}
    labels = [False] * len(scores["id"]) + [True] * len(scores["ood"])
    for score in ("mi_mean", "mi_sum", "disagreement", "entropy_mean"):
        values = [s[score] for s in scores["id"] + scores["ood"]]
        out[f"AUROC {score}"] = auroc(values, labels)
        out[f"{score} id"] = statistics.fmean(s[score] for s in scores["id"])
        out[f"{score} ood"] = statistics.fmean(s[score] for s in scores["ood"])
    out["scores"] = scores
    return out


def write_row(opts, row: dict, settings: dict) -> Path:
    """Adds (or replaces) this run's row in the mode's JSON and rewrites its markdown table."""
    out = Path(opts.output_dir)
    stem = out / f"generate_uncertainty_{opts.mode}"
    data = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {"rows": {}}
    data["rows"][opts.label] = {"row": row, "settings": settings, "machine": machine_info(),
                                "command": "python " + " ".join(sys.argv)}  # fmt: skip
    write_json_atomic(stem.with_suffix(".json"), data)
    columns = [k for k in row if k != "scores"]
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, entry in data["rows"].items():
        cells = [entry["row"].get(c) for c in columns]
        lines.append(
            f"| {label} | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"
        )
    commands = [f"- {label}: `{entry['command']}`" for label, entry in data["rows"].items()]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines + ["", "Commands:", *commands]) + "\n")
    return stem.with_suffix(".md")


def main(argv=None) -> int:
    opts, gen_argv = parse_args(argv)
    try:
        analyzer, tokenizer, prompter = load(gen_argv)
    except InputError as err:  # generate.py's own checks: the same one-line error, nothing written
        print(f"error: {err}", file=sys.stderr)
        return 2
    measure = measure_cost if opts.mode == "cost" else measure_auroc
    row = measure(analyzer, tokenizer, prompter, opts)
    md = write_row(opts, row, {"generate_flags": gen_argv, **vars(opts)})
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
