"""Training-step cost of Bayesian LoRA (BLoB) against PEFT's LoRA at the same rank, on the same tiny model.

Run (CPU or CUDA, unchanged; the device is CUDA when available unless ``--device`` says otherwise)::

    python bench/bench_bayeslora_step.py                       # defaults: llama, hidden 256, 4 layers, seq 128
    python bench/bench_bayeslora_step.py --rank 8,16 --flipout false --device cpu --dtype bfloat16
    python bench/bench_bayeslora_step.py --threads 1   # steadier CPU timings on a machine shared with other jobs
    make bench

What it measures, per configuration (LoRA, BayesLoRA with flipout, BayesLoRA without flipout) and rank:

- **step ms**: wall time of one optimizer step: ``zero_grad`` + forward + NLL (+ ``kl_weight * KL / N`` for
  BayesLoRA, as ``peft_bayes/cli/trainer.py`` adds it) + backward + ``AdamW.step``. Every configuration holds its
  own copy of the same base model (same seed, same batch). Steps are interleaved (A B C, B C A, ... one step each,
  the order rotated every round) so that drift (thermal, other load) hits all alike; on CUDA every step is bracketed
  by ``torch.cuda.synchronize``. Reported: median and IQR over all timed steps (``--repeats`` blocks of ``--steps``
  after ``--warmup`` untimed steps); the ratio is median / LoRA's median of the same run, and the JSON also holds
  the ratio of every repeat block (its spread shows how far to trust the ratio).
- **peak MiB**: peak of the torch allocator during one training step, counting everything alive: base weights and
  buffers, adapter parameters (``lora_A``/``lora_B``, BayesLoRA's ``bayeslora_rho``), AdamW state, gradients,
  activations and BayesLoRA's noise (E, flipout signs). It is ``static + transient``: ``static`` = bytes of the
  parameters, buffers and optimizer state alive when the step starts (gradients set to None), ``transient`` = the
  highest allocator level above that during the step. On CUDA the transient part comes from
  ``torch.cuda.max_memory_allocated`` (reset before the step); on CPU from ``torch.profiler`` with
  ``profile_memory=True``: the running sum of its allocation / free events. CPU memory that bypasses torch's
  allocator (oneDNN scratch, Python objects) is not counted. The JSON also gives the peak above the base model.
- **trainable params**: parameters with ``requires_grad`` (BayesLoRA adds ``rho``, the size of the Bayesian factor).

Outputs under ``--output_dir`` (default ``bench/results``): ``bayeslora_step.csv`` and ``bayeslora_step.json``
(raw step times, settings, environment) and ``bayeslora_step.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from peft_bayes import BayesLoraConfig, kl_divergence
from peft_bayes.tiny import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer

MiB = 2**20
N_TRAIN = 1000  # N of the KL term's ``KL / N``: its value does not change the cost
STEM = "bayeslora_step"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    name: str  # "lora", "bayeslora", "bayeslora-noflip"
    rank: int
    bayes: bool
    flipout: bool = False


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llama", choices=TINY_ARCHITECTURES)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=None, help="MLP width; default 4 * hidden_size")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rank", type=_ints, default=[8], help="LoRA rank(s), e.g. 8,16")
    p.add_argument(
        "--target_modules", default="all-linear", help="comma-separated module names; default every linear layer"
    )
    p.add_argument("--flipout", type=_bool, default=True, help="also run BayesLoRA with flipout (true/false)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    p.add_argument("--repeats", type=int, default=3, help="blocks of --steps; the JSON holds each block's ratio")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = torch default (1 is steadier on a busy box)"
    )
    p.add_argument("--output_dir", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    for name in ("hidden_size", "num_layers", "num_heads", "seq_len", "batch_size", "steps", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0, got {args.warmup} and {args.threads}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def variants(ranks: list[int], flipout: bool) -> list[Variant]:
    out = []
    for r in ranks:
        out.append(Variant("lora", r, bayes=False))
        if flipout:
            out.append(Variant("bayeslora", r, bayes=True, flipout=True))
        out.append(Variant("bayeslora-noflip", r, bayes=True, flipout=False))
    return out


class Runner:
    """A PEFT model, its AdamW optimizer and a fixed batch: ``step()`` is one training step."""

    def __init__(self, variant: Variant, args: argparse.Namespace, tokenizer: Any) -> None:
        self.variant, self.device = variant, torch.device(args.device)
        base = build_tiny_model(
            args.arch,
            tokenizer,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            seed=0,
        ).to(device=self.device, dtype=DTYPES[args.dtype])
        self.base_bytes = tensor_bytes(list(base.parameters()) + list(base.buffers()))
        targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
        common = dict(task_type="CAUSAL_LM", r=variant.rank, lora_alpha=2 * variant.rank, target_modules=targets)
        if variant.bayes:
            config = BayesLoraConfig(**common, flipout=variant.flipout, kl_schedule="constant")
        else:
            config = LoraConfig(**common)
        self.model = get_peft_model(base, config).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, len(tokenizer), (args.batch_size, args.seq_len), generator=gen)
        self.input_ids = ids.to(self.device)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        if self.variant.bayes:
            kl_weight = self.model.active_peft_config.kl_weight
            loss = loss + kl_weight * kl_divergence(self.model) / N_TRAIN
        loss.backward()
        self.optimizer.step()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def target_names(self) -> list[str]:
        names = {name.rsplit(".", 1)[-1] for name, m in self.model.named_modules() if hasattr(m, "lora_A")}
        return sorted(names)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(runner: Runner) -> float:
    """Seconds of one training step, the device synchronised on both sides."""
    synchronize(runner.device)
    start = time.perf_counter()
    runner.step()
    synchronize(runner.device)
    return time.perf_counter() - start


def run_timing(runners: list[Runner], warmup: int, steps: int, repeats: int) -> list[list[list[float]]]:
    """times[config][repeat][step] in seconds. Steps interleave across configurations, the order rotating."""
    n = len(runners)
    for _ in range(warmup):
        for runner in runners:
            runner.step()
    times = [[[] for _ in range(repeats)] for _ in runners]
    for rep in range(repeats):
        for i in range(steps):
            shift = (rep * steps + i) % n
            for k in [(j + shift) % n for j in range(n)]:
                times[k][rep].append(timed_step(runners[k]))
    return times


def _cpu_transient_peak(runner: Runner) -> int:
    """Highest level of torch's CPU allocator above its level at the start of one step, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = prof.profiler.kineto_results.events()  # raw events: allocations are [memory] events with nbytes > 0
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in memory:
        level += nbytes
        peak = max(peak, level)
    return peak


def measure_peak(runner: Runner) -> dict[str, int]:
    """Peak allocator bytes during one step: bytes alive at its start plus the transient peak above them."""
    runner.optimizer.zero_grad(set_to_none=True)
    state = [t for s in runner.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    model = runner.model
    static = tensor_bytes(list(model.parameters()) + list(model.buffers()) + state)
    if runner.device.type == "cuda":
        synchronize(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        start = torch.cuda.memory_allocated(runner.device)
        runner.step()
        synchronize(runner.device)
        transient = torch.cuda.max_memory_allocated(runner.device) - start
    else:
        transient = _cpu_transient_peak(runner)
    return {"static_bytes": static, "transient_bytes": transient, "peak_bytes": static + transient}


def summarize(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    q1, q2, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": q2, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "n_steps": len(ms)}


def build_rows(runners: list[Runner], times: list[list[list[float]]], peaks: list[dict]) -> list[dict[str, Any]]:
    """One row per configuration, with ratios against LoRA at the same rank."""
    rows = []
    for runner, t, peak in zip(runners, times, peaks):
        v = runner.variant
        row = {"config": v.name, "rank": v.rank, "flipout": v.flipout, **summarize([s for rep in t for s in rep])}
        row["repeat_median_ms"] = [statistics.median(rep) * 1000 for rep in t]
        row.update(peak, peak_mib=peak["peak_bytes"] / MiB)
        row["peak_above_base_mib"] = (peak["peak_bytes"] - runner.base_bytes) / MiB
        row["trainable_params"] = runner.trainable_params()
        rows.append(row)
    for row in rows:
        ref = next(r for r in rows if r["config"] == "lora" and r["rank"] == row["rank"])
        row["step_ratio"] = row["median_ms"] / ref["median_ms"]
        row["repeat_step_ratios"] = [a / b for a, b in zip(row["repeat_median_ms"], ref["repeat_median_ms"])]
        row["peak_ratio"] = row["peak_bytes"] / ref["peak_bytes"]
        row["peak_above_base_ratio"] = row["peak_above_base_mib"] / ref["peak_above_base_mib"]
        row["params_ratio"] = row["trainable_params"] / ref["trainable_params"]
    return rows


def environment(args: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    env = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_modules_resolved": runner.target_names(),
        "base_model_mib": runner.base_bytes / MiB,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
        "peak_memory_source": "torch.cuda.max_memory_allocated"
        if runner.device.type == "cuda"
        else "torch.profiler profile_memory events",
    }
    return env


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    s = env["settings"]
    head = (
        f"BayesLoRA vs LoRA training step: {s['arch']} hidden {s['hidden_size']}, {s['num_layers']} layers, "
        f"seq {s['seq_len']}, batch {s['batch_size']}, {s['dtype']} on {env['device_name']} "
        f"({env['cpu_threads']} CPU threads), targets {','.join(env['target_modules_resolved'])}; "
        f"median of {rows[0]['n_steps']} interleaved steps; peak = torch allocator peak during a step "
        f"(base model {env['base_model_mib']:.1f} MiB included).\n\n"
    )
    lines = [
        "| config | rank | step ms (median) | ratio vs LoRA | peak MiB | ratio vs LoRA | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['rank']} | {r['median_ms']:.1f} ± {r['iqr_ms'] / 2:.1f} | {r['step_ratio']:.2f} "
            f"| {r['peak_mib']:.1f} | {r['peak_ratio']:.3f} | {r['trainable_params']:,} |"
        )
    return head + "\n".join(lines) + "\n\n(± is half the IQR.)\n"


def _write_atomic(path: Path, text: str) -> None:
    """Writes to a temporary file beside ``path``, then renames: a failed run leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_outputs(out_dir: Path, rows: list[dict], times: list[list[list[float]]], env: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [k for k, v in rows[0].items() if not isinstance(v, list)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out_dir / f"{STEM}.csv", buf.getvalue())
    raw = {f"{r['config']}-r{r['rank']}": [[1000 * s for s in rep] for rep in t] for r, t in zip(rows, times)}
    payload = {**env, "rows": rows, "step_times_ms": raw}
    _write_atomic(out_dir / f"{STEM}.json", json.dumps(payload, indent=2) + "\n")
    md_path = out_dir / f"{STEM}.md"
    _write_atomic(md_path, markdown(rows, env))
    return md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    runners = [Runner(v, args, tokenizer) for v in variants(args.rank, args.flipout)]
    times = run_timing(runners, args.warmup, args.steps, args.repeats)
    peaks = [measure_peak(runner) for runner in runners]
    rows = build_rows(runners, times, peaks)
    md_path = write_outputs(args.output_dir, rows, times, environment(args, runners[0]))
    print(md_path.read_text(), end="")
    print(f"wrote {md_path.with_suffix('.csv')}, {md_path.with_suffix('.json')}, {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
