"""Option-scoring speed of the shared, cached and full paths on a real multiple-choice set, in one run.

``shared`` packs where the model allows (the prompt and every option of an example in one row, one forward pass per
batch), ``cached`` runs the prompt once per example and the options from its KV cache, ``full`` (the reference) runs
every option as its own sequence; label and cloze formats, in one process.

Run (CPU; the real model needs ``make install-real``)::

    python bench/bench_choice_scoring.py                                  # SmolLM2-135M, ARC-Easy, 100 questions
    python bench/bench_choice_scoring.py --n 200 --batch_size 8 --formats cloze
    python bench/bench_choice_scoring.py --paths full,shared --repeats 3
    python bench/bench_choice_scoring.py --base_model path/to/model --prompt_template alpaca

For every format all ``--paths`` score the same questions with the same model and batch size, rotating which goes
first over ``--repeats`` rounds, after one untimed warm-up batch per path (the packing probe, first-call costs); the
table gives the median examples/s of each path, its ratio to ``full``, and the largest difference between its option
probabilities and ``full``'s (they compute the same numbers: it should be ~1e-6).
Outputs under ``--output_dir`` (default ``bench/results``): ``choice_scoring.json`` and ``choice_scoring.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "llm-adapters" / "dataset"))
    p.add_argument("--dataset", default="ARC-Easy")
    p.add_argument("--n", type=int, default=100, help="questions (the first N of test.json)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--formats", default="label,cloze", help="comma-separated: label, cloze")
    p.add_argument("--prompt_template", default="chat", help="chat needs a tokenizer with a chat template")
    p.add_argument("--paths", default="full,cached,shared", help="comma-separated --choice_scoring paths; full first")
    p.add_argument("--repeats", type=int, default=1, help="rounds per path (the median is reported)")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def time_path(model, tok, pairs, scoring: str, batch_size: int) -> tuple[float, list]:
    from peft_bayes.evaluation.choice_scoring import score_pairs

    t0 = time.perf_counter()
    scores = score_pairs(model, tok, pairs, batch_size, scoring=scoring)
    return time.perf_counter() - t0, [s.softmax(-1) for s in scores]


def _paths(args) -> list[str]:
    from peft_bayes.evaluation.choice_scoring import SCORING_PATHS

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if paths[:1] != ["full"] or any(p not in SCORING_PATHS for p in paths):
        sys.exit(f"error: --paths must start with full and name paths among {'/'.join(SCORING_PATHS)}")
    return paths


def bench_format(model, tok, prompter, path: str, args, fmt: str) -> dict:
    from peft_bayes.evaluation.datasets import load_eval_set

    data = load_eval_set(args.dataset, path, args.n, prompter, fmt)
    paths = _paths(args)
    for scoring in paths:  # warm-up: the packing probe and first-call allocations are not timed
        time_path(model, tok, data.pairs[: args.batch_size], scoring, args.batch_size)
    times: dict[str, list[float]] = {p: [] for p in paths}
    probs = {}
    for r in range(args.repeats):
        for scoring in paths[r % len(paths) :] + paths[: r % len(paths)]:
            wall, probs[scoring] = time_path(model, tok, data.pairs, scoring, args.batch_size)
            times[scoring].append(wall)
            print(f"{fmt:6s} {scoring:6s} round {r + 1}: {len(data.pairs) / wall:.2f} examples/s", flush=True)
    rate = {k: len(data.pairs) / statistics.median(v) for k, v in times.items()}
    n_tokens = [len(tok(c + x)["input_ids"]) for pairs in data.pairs for c, x in pairs]
    row = {
        "format": fmt,
        "n": len(data.pairs),
        "options_mean": sum(len(p) for p in data.pairs) / len(data.pairs),
        "option_tokens_mean": sum(n_tokens) / len(n_tokens),
        "paths": paths,
        "wall_s": times,
    }
    for scoring in paths:
        row[f"{scoring}_examples_per_s"] = rate[scoring]
        if scoring != "full":
            diff = max(float((a - b).abs().max()) for a, b in zip(probs["full"], probs[scoring]))
            row[f"{scoring}_speedup"] = rate[scoring] / rate["full"]
            row[f"{scoring}_max_abs_prob_diff"] = diff
    fastest = max(paths, key=lambda k: rate[k])
    row["accuracy_percent"] = (
        100 * sum(int(p.argmax()) == g for p, g in zip(probs[fastest], data.golds)) / len(data.golds)
    )
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    others = [p for p in rows[0]["paths"] if p != "full"]
    head = "| format | options / question | tokens / option sequence | full (examples/s) |"
    head += "".join(f" {p} (examples/s) | {p} speed-up | {p} max abs prob diff |" for p in others) + " ACC (%) |"
    lines = [
        f"Option scoring, {meta['base_model']} on {meta['dataset']} ({rows[0]['n']} questions), batch "
        f"{meta['batch_size']}, template {meta['prompt_template']}, {meta['torch_threads']} torch threads "
        f"({meta['cpu']}), median of {meta['repeats']} round(s).",
        "",
        head,
        "|---|---:|---:|---:|" + "---:|---:|---:|" * len(others) + "---:|",
    ]
    for r in rows:
        cells = [r["format"], f"{r['options_mean']:.2f}", f"{r['option_tokens_mean']:.0f}"]
        cells.append(f"{r['full_examples_per_s']:.2f}")
        for p in others:
            cells += [f"{r[p + '_examples_per_s']:.2f}", f"**{r[p + '_speedup']:.2f}x**"]
            cells.append(f"{r[p + '_max_abs_prob_diff']:.1e}")
        cells.append(f"{r['accuracy_percent']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from peft_bayes.io import write_json_atomic, write_text_atomic
    from peft_bayes.models import load_base_model, load_prompter, load_tokenizer

    args = parse_args(argv)
    path = os.path.join(args.data_dir, args.dataset, "test.json")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found (set --data_dir)")
    model = load_base_model(args.base_model).eval()
    tok = load_tokenizer(args.base_model, padding_side="left")
    prompter = load_prompter(args.prompt_template, args.base_model)
    rows = [bench_format(model, tok, prompter, path, args, f.strip()) for f in args.formats.split(",") if f.strip()]
    meta = {
        "base_model": args.base_model,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "prompt_template": args.prompt_template,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "torch": torch.__version__,
        "command": "python bench/bench_choice_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = markdown(rows, meta)
    print("\n" + table)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(args.output_dir, "choice_scoring.json"), {"meta": meta, "rows": rows})
    write_text_atomic(os.path.join(args.output_dir, "choice_scoring.md"), table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
