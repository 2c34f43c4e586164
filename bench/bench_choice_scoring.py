"""Option-scoring speed: the shared path (prompt once per example, options from its KV cache) against the full path
(every option its own sequence), on a real multiple-choice set, label and cloze formats, in one process and one run.

Run (CPU; the real model needs ``make install-real``)::

    python bench/bench_choice_scoring.py                                  # SmolLM2-135M, ARC-Easy, 100 questions
    python bench/bench_choice_scoring.py --n 200 --batch_size 8 --formats cloze
    python bench/bench_choice_scoring.py --base_model path/to/model --prompt_template alpaca

For every format both paths score the same questions with the same model and batch size, alternating which goes
first over ``--repeats`` rounds; the table gives the median examples/s of each path, their ratio, and the largest
difference between the two paths' option probabilities (they compute the same numbers: it should be ~1e-7).
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
    p.add_argument("--repeats", type=int, default=1, help="rounds per path (the median is reported)")
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def time_path(model, tok, data, scoring: str, batch_size: int) -> tuple[float, list]:
    from peft_bayes.evaluation.choice_scoring import score_pairs

    t0 = time.perf_counter()
    scores = score_pairs(model, tok, data.pairs, batch_size, scoring=scoring)
    return time.perf_counter() - t0, [s.softmax(-1) for s in scores]


def bench_format(model, tok, prompter, path: str, args, fmt: str) -> dict:
    from peft_bayes.cli.evaluate import load_eval_set

    data = load_eval_set(args.dataset, path, args.n, prompter, fmt)
    times: dict[str, list[float]] = {"full": [], "shared": []}
    probs = {}
    for r in range(args.repeats):
        for scoring in ("full", "shared") if r % 2 == 0 else ("shared", "full"):
            wall, probs[scoring] = time_path(model, tok, data, scoring, args.batch_size)
            times[scoring].append(wall)
            print(f"{fmt:6s} {scoring:6s} round {r + 1}: {len(data.pairs) / wall:.2f} examples/s", flush=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(probs["full"], probs["shared"]))
    acc = 100 * sum(int(p.argmax()) == g for p, g in zip(probs["shared"], data.golds)) / len(data.golds)
    rate = {k: len(data.pairs) / statistics.median(v) for k, v in times.items()}
    n_tokens = [len(tok(c + x)["input_ids"]) for pairs in data.pairs for c, x in pairs]
    return {
        "format": fmt,
        "n": len(data.pairs),
        "options_mean": sum(len(p) for p in data.pairs) / len(data.pairs),
        "option_tokens_mean": sum(n_tokens) / len(n_tokens),
        "full_examples_per_s": rate["full"],
        "shared_examples_per_s": rate["shared"],
        "speedup": rate["shared"] / rate["full"],
        "max_abs_prob_diff": diff,
        "accuracy_percent": acc,
        "wall_s": times,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Option scoring, {meta['base_model']} on {meta['dataset']} ({rows[0]['n']} questions), batch "
        f"{meta['batch_size']}, template {meta['prompt_template']}, {meta['torch_threads']} torch threads "
        f"({meta['cpu']}).",
        "",
        "| format | options / question | tokens / option sequence | full (examples/s) | shared (examples/s) | "
        "speed-up | max abs prob diff | ACC (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['options_mean']:.2f} | {r['option_tokens_mean']:.0f} | "
            f"{r['full_examples_per_s']:.2f} | {r['shared_examples_per_s']:.2f} | **{r['speedup']:.2f}x** | "
            f"{r['max_abs_prob_diff']:.1e} | {r['accuracy_percent']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from peft_bayes.cli.common import write_json_atomic, write_text_atomic
    from peft_bayes.cli.modeling import load_base_model, load_prompter, load_tokenizer

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
