"""Cost of fitting a Laplace posterior against one plain gradient pass over the same data.

Run (CPU; the real model needs ``make install-real``)::

    python bench/bench_laplace_fit.py                                    # tiny LLaMA, synthetic 4-option questions
    python bench/bench_laplace_fit.py --base_model smollm2-135m --n 64 \
        --data_path ../shared/data/llm-adapters/dataset/ARC-Easy/train.json

Both passes see the same multiple-choice batches (every option one row, the ``full`` scoring path): the gradient pass
is ``choice_nll(...).backward()`` into the LoRA weights (what one training epoch costs without the optimizer); the fit
is ``Laplace.fit`` (forward, the Fisher's backward vectors into the recorded adapter outputs, the K-FAC / diagonal
statistics, the eigendecompositions and the marginal-likelihood prior search). Each is timed ``--repeats`` times
after one warm-up; the table reports the median seconds and the ratio fit / gradient pass, per structure, written to
``bench/results/laplace_fit.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="tiny", help="tiny (a random tiny LLaMA), smollm2-135m or a folder")
    p.add_argument("--data_path", default=None, help="multiple-choice JSON (default: synthetic questions)")
    p.add_argument("--n", type=int, default=32, help="questions")
    p.add_argument("--batch_size", type=int, default=8, help="questions per batch")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--target_modules", default="q_proj,v_proj")
    p.add_argument("--structures", default="kron,diag", help="comma list of kron, diag, full")
    p.add_argument("--fisher", default="mc", choices=["empirical", "mc", "exact"])
    p.add_argument("--subset", default="all", choices=["all", "last_layer"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def load(args):
    from peft import LoraConfig, get_peft_model

    if args.base_model == "tiny":
        from peft_bayes.tiny import build_tiny_model, build_tokenizer

        tok = build_tokenizer()
        hidden, layers, heads = getattr(args, "tiny_size", (64, 2, 4))  # bench_kfac.py --tiny_size
        model = build_tiny_model("llama", tok, hidden_size=hidden, num_layers=layers, num_heads=heads)
    else:
        from transformers import AutoModelForCausalLM

        from peft_bayes.models import load_tokenizer, resolve_model

        path = resolve_model(args.base_model)
        tok = load_tokenizer(path, False, padding_side="right")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(args, "adapter", None):  # a trained adapter folder (bench_kfac.py --adapter)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, args.adapter, is_trainable=True).eval(), tok
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=args.target_modules.split(","), init_lora_weights=False
    )
    return get_peft_model(model, config).eval(), tok


def batches(args, model, tok, path=None, n=None):
    """``n`` questions of ``path`` (default ``--data_path``, or synthetic ones) as differentiable choice batches."""
    from peft_bayes.data.prompts import Prompter
    from peft_bayes.evaluation.datasets import load_eval_set
    from peft_bayes.evaluation.predictive import PairScorer

    n = n or args.n
    path = path or args.data_path
    if path is None:
        from peft_bayes.data.synthetic import make_choice_problems

        path = os.path.join(args.output_dir, ".laplace_fit_questions.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(make_choice_problems(n, seed=0, n_options=4), f)
    fmt = "label" if args.data_path is None else "cloze"
    template = getattr(args, "prompt_template", "alpaca_short")
    prompter = Prompter.from_name(template, tokenizer=tok)
    data = load_eval_set("fit", path, n, prompter, fmt)
    return PairScorer(model, tok, data.pairs, args.batch_size, "full", "none", data.golds).batches()


def gradient_pass(model, data) -> None:
    from peft_bayes.posterior.likelihood import choice_nll

    model.zero_grad(set_to_none=True)
    for batch in data:
        choice_nll(model, batch).backward()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    from peft_bayes.io import write_json_atomic, write_text_atomic
    from peft_bayes.posterior import Laplace

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    model, tok = load(args)
    data = batches(args, model, tok)
    n_rows = sum(int(b.input_ids.shape[0]) for b in data)
    n_tokens = sum(int(b.attention_mask.sum()) for b in data)
    print(
        f"{args.base_model}: {len(data)} batches, {n_rows} option rows, {n_tokens} tokens; threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    grad = timed(lambda: gradient_pass(model, data), args.repeats)
    rows = []
    for structure in args.structures.split(","):

        def fit(structure=structure):
            Laplace(model, structure=structure, fisher=args.fisher, subset=args.subset).fit(data)

        times = timed(fit, args.repeats)
        ratio = statistics.median(times) / statistics.median(grad)
        rows.append({"structure": structure, "fit_s": times, "ratio": ratio})
        print(f"{structure}: fit {statistics.median(times):.2f} s = {ratio:.2f}x the gradient pass", flush=True)
    md = [f"Laplace fit vs one gradient pass, {args.base_model}, {args.n} questions ({n_rows} option rows), fisher "
          f"{args.fisher}, subset {args.subset}, median of {args.repeats} (after a warm-up)", "",
          "| structure | gradient pass (s) | Laplace fit (s) | fit / gradient pass |",
          "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(
            f"| {r['structure']} | {statistics.median(grad):.2f} | {statistics.median(r['fit_s']):.2f} | "
            f"{r['ratio']:.2f}x |"
        )
    stem = os.path.join(args.output_dir, "laplace_fit" + ("" if args.base_model == "tiny" else "_" + args.base_model))
    write_json_atomic(
        stem + ".json",
        {
            "args": vars(args),
            "gradient_pass_s": grad,
            "rows": rows,
            "n_rows": n_rows,
            "n_tokens": n_tokens,
            "torch_threads": torch.get_num_threads(),
        },
    )
    write_text_atomic(stem + ".md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
