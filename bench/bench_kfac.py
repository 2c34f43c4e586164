"""K-FAC statistics: the curvature pass against one plain gradient pass, factor memory, low-rank against full factors.

Run (CPU; the real model needs ``make install-real``)::

    python bench/bench_kfac.py                                          # tiny LLaMA, synthetic 4-option questions
    python bench/bench_kfac.py --base_model smollm2-135m --n 64 --prompt_template chat \
        --data_path ../shared/data/llm-adapters/dataset/ARC-Easy/train.json
    # low-rank vs full factors of a trained adapter: log marginal likelihood, ACC / ECE of the GLM predictive
    python bench/bench_kfac.py --base_model smollm2-135m --adapter ADAPTER_DIR --prompt_template chat \
        --data_path TRAIN.json --n 200 --test_path ../shared/data/llm-adapters/dataset/ARC-Easy/test.json \
        --n_test 200 --sections compare
    # GPU: --device cuda --dtype bfloat16 (the fused Triton kernels run where the tensors are on CUDA)

Sections (``--sections``, default ``pass,memory``):

- ``pass``: over the same multiple-choice batches (every option one row), the seconds of one plain gradient pass
  (``choice_nll(...).backward()`` into the adapter weights: a training epoch without the optimizer) and of the
  K-FAC curvature pass (``Laplace.accumulate``: forward, the Fisher's backward vectors and the statistics of every
  adapter weight; no eigendecomposition or prior search), for each statistics kernel (``reference``; ``triton``
  where the tensors are on CUDA) with dense factors, and with low-rank streamed factors (``--kfac_rank`` above
  ``--kfac_threshold``). Median of ``--repeats`` after one warm-up, rotating the order every round.
- ``memory``: bytes of the K-FAC factors of a LoRA on LLaMA-7B's shapes (r 8; q_proj, v_proj), dense and low-rank
  (computed, ``peft_bayes.posterior.lowrank.factor_memory``).
- ``compare`` (needs ``--test_path``): Laplace fitted with full and with low-rank factors on the same data: log
  marginal likelihood at the tuned prior, captured eigenvalue mass, and ACC / ECE / NLL of the GLM probit predictive
  on the test questions.

Outputs under ``--output_dir`` (default ``bench/results``): ``kfac[_<model>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_laplace_fit as common  # noqa: E402  (load, batches, gradient_pass)

SECTIONS = ("pass", "memory", "compare")


def _tiny_size(text: str) -> tuple[int, int, int]:
    try:
        hidden, layers, heads = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HIDDENxLAYERSxHEADS, e.g. 2048x4x16") from None
    if min(hidden, layers, heads) < 1 or hidden % heads:
        raise argparse.ArgumentTypeError(f"{text!r}: positive sizes, hidden a multiple of heads")
    return hidden, layers, heads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="tiny", help="tiny (a random tiny LLaMA), smollm2-135m or a folder")
    p.add_argument(
        "--tiny_size",
        type=_tiny_size,
        default=(64, 2, 4),
        metavar="HIDDENxLAYERSxHEADS",
        help="--base_model tiny: its hidden size, layers and heads (GPU: e.g. 2048x4x16)",
    )
    p.add_argument("--adapter", default=None, help="a trained adapter folder (default: a random LoRA)")
    p.add_argument("--data_path", default=None, help="multiple-choice JSON (default: synthetic questions)")
    p.add_argument("--prompt_template", default="alpaca_short", help="chat: the tokenizer's chat template")
    p.add_argument("--n", type=int, default=32, help="questions of the curvature data")
    p.add_argument("--batch_size", type=int, default=8, help="questions per batch")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapter")
    p.add_argument("--target_modules", default="q_proj,v_proj")
    p.add_argument("--fisher", default="mc", choices=["empirical", "mc", "exact"])
    p.add_argument("--kfac", default="expand", choices=["expand", "reduce"])
    p.add_argument("--kfac_rank", type=int, default=32, help="rank of the low-rank factors")
    p.add_argument(
        "--kfac_threshold",
        type=int,
        default=None,
        help="width above which factors are low-rank (default: 16 on the tiny model, 256 otherwise)",
    )
    p.add_argument(
        "--kernels", default=None, help="comma list of reference, triton (default: reference, and triton on CUDA)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--test_path", default=None, help="compare: multiple-choice test JSON")
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--memory_ranks", default="64,128,256", help="memory: low-rank ranks of the LLaMA-7B table")
    p.add_argument("--sections", default="pass,memory", help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown --sections {unknown}; known: {', '.join(SECTIONS)}")
    if "compare" in args.sections and not args.test_path:
        p.error("--sections compare needs --test_path")
    if args.kfac_threshold is None:
        args.kfac_threshold = 16 if args.base_model == "tiny" else 256
    if args.kernels is None:
        args.kernels = "reference,triton" if args.device.startswith("cuda") else "reference"
    args.kernels = args.kernels.split(",")
    return args


def laplace(model, args, low_rank: bool):
    from peft_bayes.posterior import Laplace

    extra = {"kfac_rank": args.kfac_rank, "kfac_threshold": args.kfac_threshold} if low_rank else {}
    return Laplace(model, structure="kron", fisher=args.fisher, kfac=args.kfac, **extra)


def pass_section(args, model, data) -> dict:
    """Median seconds of the gradient pass and of each curvature pass, rotated over the rounds."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    from peft_bayes.kernels.kfac import kfac_path

    runs = {"gradient pass": lambda: common.gradient_pass(model, data)}
    paths: dict[str, str] = {}
    for kernel in args.kernels:
        for low_rank in (False, True):

            def curvature(kernel=kernel, low_rank=low_rank):
                os.environ["PEFT_BAYES_KERNEL"] = kernel
                try:
                    laplace(model, args, low_rank).accumulate(data)
                finally:
                    os.environ.pop("PEFT_BAYES_KERNEL", None)

            os.environ["PEFT_BAYES_KERNEL"] = kernel  # the path the statistics take (checked, recorded)
            try:
                paths[kernel] = kfac_path(torch.empty(1, device=args.device))
            finally:
                os.environ.pop("PEFT_BAYES_KERNEL", None)
            name = f"K-FAC pass, {kernel}, " + (f"low-rank (rank {args.kfac_rank})" if low_rank else "dense")
            runs[name] = curvature
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (first-call costs, Triton compilation)
        fn()
    names = list(runs)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            sync()
            t = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - t)
            print(f"round {round_ + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["gradient pass"])
    out = {
        name: {"seconds": t, "median_s": statistics.median(t), "ratio": statistics.median(t) / base}
        for name, t in times.items()
    }
    for name, row in out.items():
        row["kernel_path"] = next((paths[k] for k in paths if f", {k}, " in name), None)
    return out


def memory_section(args) -> list[dict]:
    from peft_bayes.posterior.lowrank import factor_memory, llama7b_lora_shapes

    shapes = llama7b_lora_shapes(8, ("q_proj", "v_proj"))
    rows = [{"factors": "dense", "bytes": factor_memory(shapes)}]
    for rank in (int(r) for r in args.memory_ranks.split(",")):
        rows.append({"factors": f"low-rank, rank {rank}", "bytes": factor_memory(shapes, rank)})
    return rows


def compare_section(args, model, tok, data) -> list[dict]:
    """Full against low-rank factors on the same fit data: lml, captured mass, GLM probit metrics on the test set."""
    from peft_bayes import metrics
    from peft_bayes.data.prompts import Prompter
    from peft_bayes.evaluation.datasets import load_eval_set
    from peft_bayes.evaluation.predictive import PairScorer

    fmt = "label" if args.data_path is None else "cloze"  # as the fit data (common.batches)
    test = load_eval_set("test", args.test_path, args.n_test, Prompter.from_name(args.prompt_template, tok), fmt)
    scorer = PairScorer(model, tok, test.pairs, args.batch_size, "full", "none", test.golds)
    labels = torch.tensor(test.golds)
    rows = []
    for low_rank in (False, True):
        posterior = laplace(model, args, low_rank)
        t = time.perf_counter()
        posterior.fit(data, progress=lambda done, n: print(f"\rfit {done}/{n}", end="", flush=True))
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        probs = posterior.option_probs(scorer, 0, 0, lambda done, n: print(f"\rGLM {done}/{n}", end="", flush=True))
        eval_s = time.perf_counter() - t
        width = max(len(p) for p in probs)  # pad to a (n, options) matrix: absent options get probability 0
        matrix = torch.stack([torch.nn.functional.pad(p, (0, width - len(p))) for p in probs]).float()
        rows.append(
            {
                "factors": f"low-rank (rank {args.kfac_rank}, > {args.kfac_threshold})" if low_rank else "full",
                "lml": float(posterior.log_marginal_likelihood()),
                "prior_precision": posterior.prior_precision.tolist(),
                "captured_mass_min": min(posterior.captured_mass),
                "acc": 100 * metrics.accuracy(matrix, labels),
                "ece": 100 * metrics.expected_calibration_error(matrix, labels),
                "nll": metrics.negative_log_likelihood(matrix, labels),
                "fit_s": fit_s,
                "eval_s": eval_s,
                "block_kinds": sorted({b.kind for b in posterior.blocks}),
            }
        )
        print(f"\n{rows[-1]}", flush=True)
    full, low = rows
    low["lml_rel_diff"] = abs(low["lml"] - full["lml"]) / abs(full["lml"])
    low["ece_diff_points"] = low["ece"] - full["ece"]
    return rows


def markdown(args, info: dict, result: dict) -> str:
    md = [f"K-FAC statistics, {info['model']}: {info['n']} questions ({info['rows']} option rows, {info['tokens']} "
          f"tokens), fisher {args.fisher}, {args.kfac}, device {args.device}, {args.dtype}, "
          f"{info['threads']} torch threads", ""]  # fmt: skip
    if "pass" in result:
        md += [
            f"Median of {args.repeats} after a warm-up:",
            "",
            "| pass | seconds | / gradient pass |",
            "|---|---:|---:|",
        ]
        md += [f"| {name} | {r['median_s']:.2f} | {r['ratio']:.2f}x |" for name, r in result["pass"].items()]
        md.append("")
    if "memory" in result:
        md += [
            "K-FAC factor memory, LoRA r 8 on LLaMA-7B q_proj and v_proj (128 weights; fp32; computed):",
            "",
            "| factors | bytes | GiB |",
            "|---|---:|---:|",
        ]
        md += [f"| {r['factors']} | {r['bytes']:,} | {r['bytes'] / 2**30:.3f} |" for r in result["memory"]]
        md.append("")
    if "compare" in result:
        md += [
            f"Full vs low-rank factors ({args.n} fit questions, {args.n_test} test questions of "
            f"{os.path.basename(os.path.dirname(args.test_path))}, GLM probit):",
            "",
            "| factors | log marginal likelihood | captured mass (min) | ACC % | ECE % | NLL | fit s | eval s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        md += [
            f"| {r['factors']} | {r['lml']:.2f} | {r['captured_mass_min']:.4f} | {r['acc']:.2f} | {r['ece']:.2f} | "
            f"{r['nll']:.4f} | {r['fit_s']:.0f} | {r['eval_s']:.0f} |"
            for r in result["compare"]
        ]
        low = result["compare"][1]
        md += [
            "",
            f"Low-rank vs full: log marginal likelihood {100 * low['lml_rel_diff']:.3f} % apart, ECE "
            f"{low['ece_diff_points']:+.2f} points.",
        ]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    from peft_bayes.io import write_json_atomic, write_text_atomic

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    result: dict = {}
    model_name = args.base_model if args.base_model != "tiny" else "tiny LLaMA {}x{}x{}".format(*args.tiny_size)
    info = {"model": model_name, "n": 0, "rows": 0, "tokens": 0, "threads": torch.get_num_threads()}
    if "pass" in args.sections or "compare" in args.sections:
        model, tok = common.load(args)
        model.to(device=args.device, dtype=getattr(torch, args.dtype))
        data = [b.to(args.device) if hasattr(b, "to") else b for b in common.batches(args, model, tok)]
        info.update(
            n=args.n,
            rows=sum(int(b.input_ids.shape[0]) for b in data),
            tokens=sum(int(b.attention_mask.sum()) for b in data),
        )
        print(
            f"{args.base_model}: {len(data)} batches, {info['rows']} option rows, {info['tokens']} tokens; "
            f"threads {info['threads']}",
            flush=True,
        )
        if "pass" in args.sections:
            result["pass"] = pass_section(args, model, data)
        if "compare" in args.sections:
            result["compare"] = compare_section(args, model, tok, data)
    if "memory" in args.sections:
        result["memory"] = memory_section(args)
    md = markdown(args, info, result)
    name = "kfac" if args.base_model == "tiny" else "kfac_" + os.path.basename(args.base_model.rstrip("/"))
    if args.sections != ["pass", "memory"]:
        name += "_" + "_".join(args.sections)
    stem = os.path.join(args.output_dir, name)
    write_json_atomic(stem + ".json", {"args": vars(args), "info": info, **result})
    write_text_atomic(stem + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
