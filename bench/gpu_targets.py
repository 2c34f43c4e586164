"""The GPU check's targets, met or missed, read from the benchmark results in one folder.

Run (bench/gpu_check.sh's last step; any folder holding the benchmarks' JSON)::

    python bench/gpu_targets.py bench/results --output targets.md

Targets (the fused kernels' reason to exist; bf16 on a CUDA GPU):

1. ``bench_sampled_lora.py``: the fused BayesLoRA layer (sampling, flipout) forward + backward within 1.05x of
   PEFT's LoRA layer on a plain base, 4096 x 4096, 4096 tokens; one verdict per rank;
2. the same within 1.10x of PEFT + bitsandbytes QLoRA on an NF4 base;
3. no per-token noise in memory: the fused BayesLoRA pass allocates less than half of one tokens x d_in tensor (in
   the benchmark's dtype) above PEFT LoRA's pass; the PyTorch reference holds per-token flipout signs of that size;
4. ``bench_kfac.py``: the K-FAC curvature pass with the fused statistics kernel within 1.3x of one gradient pass.

The training-step benchmark (``bench_bayeslora_step.py``), when present, is listed for information (no target).
Where the shape or token count of a target was not run, the largest run case stands in and the row says so; on CPU
(a dry run) every verdict is marked "CPU: not a measurement". Missing result files give a "no result" row. Writes the
markdown to ``--output`` (and stdout); exit status 0, or 2 on an unreadable folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET_SHAPE, TARGET_TOKENS = "4096x4096", 4096
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _size(shape: str) -> int:
    d_in, d_out = shape.split("x")
    return int(d_in) * int(d_out)


def _case_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of the target case (shape, tokens), or of the largest case run, with a note when it differs."""
    shapes = {r["shape"] for r in rows}
    shape = TARGET_SHAPE if TARGET_SHAPE in shapes else max(shapes, key=lambda s: _size(s))
    tokens_run = {r["tokens"] for r in rows if r["shape"] == shape}
    tokens = TARGET_TOKENS if TARGET_TOKENS in tokens_run else max(tokens_run)
    note = "" if (shape, tokens) == (TARGET_SHAPE, TARGET_TOKENS) else f" (stand-in: {shape}, {tokens} tokens)"
    return [r for r in rows if r["shape"] == shape and r["tokens"] == tokens], note


def _verdict(value: float | None, limit: float, on_gpu: bool) -> str:
    if value is None:
        return "no result"
    met = "met" if value <= limit else "missed"
    return met if on_gpu else f"{met} (CPU: not a measurement)"


def sampled_lora_rows(result: dict | None) -> list[tuple[str, str, str, str]]:
    if result is None:
        return [("fused BayesLoRA layer fwd+bwd vs PEFT LoRA", "<= 1.05x / 1.10x", "-", "no result")]
    on_gpu = result.get("cuda") is not None
    rows, note = _case_rows(result["rows"])
    out = []
    for base, limit, what in (("fp", 1.05, "PEFT LoRA"), ("nf4", 1.10, "PEFT + bitsandbytes QLoRA (NF4)")):
        for row in sorted(
            (r for r in rows if r["base"] == base and r["config"] == "fused_bayeslora"), key=lambda r: r["rank"]
        ):
            ratio = row.get("fwdbwd_vs_peft_lora")
            path = "" if row.get("kernel") == "triton" else f", {row.get('kernel')} path"
            name = f"fused BayesLoRA fwd+bwd vs {what}, rank {row['rank']}{path}{note}"
            out.append(
                (name, f"<= {limit:.2f}x", "-" if ratio is None else f"{ratio:.3f}x", _verdict(ratio, limit, on_gpu))
            )
    for row in sorted((r for r in rows if r["config"] == "fused_bayeslora"), key=lambda r: (r["base"], r["rank"])):
        extra = row.get("extra_peak_vs_peft_lora_mib")
        limit = row["tokens"] * row["d_in"] * BYTES.get(row["dtype"], 4) / 2**20 / 2
        name = f"fused BayesLoRA extra peak vs PEFT LoRA, {row['base']}, rank {row['rank']}{note}"
        value = "n/a (CPU)" if extra is None else f"{extra:.1f} MiB"
        verdict = (
            "no result (peak memory is measured on CUDA only)"
            if extra is None
            else ("met" if extra < limit else "missed")
        )
        out.append((name, f"< {limit:.3g} MiB (half a tokens x d_in tensor)", value, verdict))
    return out


def kfac_rows(result: dict | None) -> list[tuple[str, str, str, str]]:
    name = "K-FAC pass (fused statistics, dense factors) vs gradient pass"
    if result is None or "pass" not in result:
        return [(name, "<= 1.30x", "-", "no result")]
    on_gpu = str(result["args"].get("device", "cpu")).startswith("cuda")
    row = result["pass"].get("K-FAC pass, triton, dense")
    if row is None:
        return [(name, "<= 1.30x", "-", "no result (the triton kernel did not run)")]
    return [
        (
            f"{name}, {result['info']['model']}",
            "<= 1.30x",
            f"{row['ratio']:.3f}x",
            _verdict(row["ratio"], 1.30, on_gpu),
        )
    ]


def step_lines(result: dict | None) -> list[str]:
    if result is None:
        return []
    lines = ["", "Training step (bench_bayeslora_step.py; information, no target):", "",
             "| base | kernel | config | rank | step ms | vs LoRA | peak MiB | fused layers |",
             "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['base']} | {r['kernel']} | {r['config']} | {r['rank']} | {r['median_ms']:.1f} | "
            f"{r['step_ratio']:.3f}x | {r['peak_mib']:.0f} | {r['fused_layers']} |"
        )
    return lines


def markdown(folder: Path) -> str:
    sampled, step = (_load(folder, n) for n in ("sampled_lora", "bayeslora_step"))
    kfac = _load(folder, "kfac") or _load(folder, "kfac_pass")  # bench_kfac.py --sections pass writes kfac_pass
    env = _load(folder, "env") or {}
    head = (
        f"## Targets ({env.get('gpu') or 'no GPU'}; torch {env.get('torch', '?').split(' ')[0]}, triton "
        f"{env.get('triton', '?').split(' ')[0]})"
    )
    lines = [head, "", "| target | limit | measured | verdict |", "|---|---|---:|---|"]
    for row in sampled_lora_rows(sampled) + kfac_rows(kfac):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + step_lines(step)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="folder with sampled_lora.json, kfac.json, bayeslora_step.json")
    p.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"gpu_targets.py: {args.results} is not a folder", file=sys.stderr)
        return 2
    md = markdown(args.results)
    if args.output is not None:
        args.output.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
