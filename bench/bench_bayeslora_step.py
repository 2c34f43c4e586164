"""Training-step cost of Bayesian LoRA (BLoB) against PEFT's LoRA at the same rank, on the same model: full-precision
or NF4 base, BayesLoRA's update through the pure-PyTorch reference or the fused Triton kernel.

Run (CPU or CUDA, unchanged; the device is CUDA when available unless ``--device`` says otherwise)::

    python bench/bench_bayeslora_step.py                       # defaults: llama, hidden 256, 4 layers, seq 128
    python bench/bench_bayeslora_step.py --rank 8,16 --flipout false --device cpu --dtype bfloat16
    python bench/bench_bayeslora_step.py --threads 1   # steadier CPU timings on a machine shared with other jobs
    python bench/bench_bayeslora_step.py --preset 1b --base fp,nf4 --dtype bfloat16   # GPU: ~1.1B LLaMA
    TRITON_INTERPRET=1 python bench/bench_bayeslora_step.py --hidden_size 64 --num_layers 1 --num_heads 2 \\
        --seq_len 8 --batch_size 2 --steps 2 --repeats 2 --base fp,nf4 --kernel reference,triton --device cpu \\
        --threads 1   # CPU: every path at tiny shapes
    make bench

Three axes, one row per point:

- **base**: ``fp`` = the model in ``--dtype``; ``nf4`` = the same weights saved and reloaded through transformers'
  ``BitsAndBytesConfig`` (QLoRA: NF4, double quantisation, compute dtype ``--dtype``, as ``train.py --load_4bit``
  loads a base, without ``prepare_model_for_kbit_training``'s float32 upcast of the other layers), so every
  ``Linear`` of the decoder blocks is a bitsandbytes ``Linear4bit``; embeddings, norms and ``lm_head`` stay in
  ``--dtype``.
- **kernel** (BayesLoRA only; ``-`` for LoRA): the path of ``peft_bayes.kernels.sampled_lora.add_sampled_lora``,
  chosen by setting ``PEFT_BAYES_KERNEL`` around each step: ``reference`` (plain PyTorch, noise held in memory) or
  ``triton`` (the fused kernel, noise regenerated in registers; on CPU only under ``TRITON_INTERPRET=1`` set before
  the run, which makes it slow: that run checks the path, its times mean nothing). Default: both on CUDA, on CPU
  ``reference`` unless ``TRITON_INTERPRET=1``. Column ``fused_layers`` counts the layers whose forward went through
  the fused kernel (profiler records of ``peft_bayes.kernels``' autograd Functions in one forward; a warning when it
  contradicts the row): 0 for ``reference``, every adapted layer for ``triton`` at rank <= 128 (higher ranks fall
  back to the reference inside the library).
- **config**: ``lora`` (PEFT), ``bayeslora`` (flipout), ``bayeslora-noflip``; and the rank. Adapter weights are
  float32 whatever ``--dtype`` (PEFT's ``autocast_adapter_dtype`` default); no ``torch.autocast``.

Model size: ``--preset tiny`` (default: hidden 256, 4 layers, seq 128, batch 8) or ``--preset 1b``, TinyLlama-1.1B's
shape with random weights (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000; seq 512, batch 4).
Explicit size flags override the preset.

What it measures, per row:

- **step ms**: wall time of one optimizer step: ``zero_grad`` + forward + NLL (+ ``kl_weight * KL / N`` for
  BayesLoRA, as ``peft_bayes/training.py`` adds it) + backward + ``AdamW.step``. Every configuration holds its
  own copy of the same base model (same seed, same batch). Steps are interleaved (A B C, B C A, ... one step each,
  the order rotated every round) so that drift (thermal, other load) hits all alike; on CUDA every step is bracketed
  by ``torch.cuda.synchronize``. Reported: median and IQR over all timed steps (``--repeats`` blocks of ``--steps``
  after ``--warmup`` untimed steps). ``step_ratio`` is median / LoRA's median on the same base and rank;
  ``step_ratio_vs_reference`` (BayesLoRA rows, when both kernels ran) is median / the same configuration's median
  with the reference kernel. The JSON also holds the ratios of every repeat block (their spread shows how far to
  trust a ratio).
- **peak MiB**: peak of the torch allocator during one training step, counting everything alive: base weights and
  buffers (NF4: packed weights and their quantisation state), adapter parameters (``lora_A``/``lora_B``,
  BayesLoRA's ``bayeslora_rho``), AdamW state, gradients, activations and BayesLoRA's noise (E, flipout signs). It is
  ``static + transient``: ``static`` = bytes of the parameters, buffers, quantisation state and optimizer state alive
  when the step starts (gradients set to None), ``transient`` = the highest allocator level above that during the
  step. On CUDA the transient part comes from ``torch.cuda.max_memory_allocated`` (reset before the step); on CPU
  from ``torch.profiler`` with ``profile_memory=True``: the running sum of its allocation / free events. CPU memory
  that bypasses torch's allocator (oneDNN scratch, Python objects) is not counted. The JSON also gives the peak
  above the base model. Ratios as for step ms.
- **trainable params**: parameters with ``requires_grad`` (BayesLoRA adds ``rho``, the size of the Bayesian factor).

Outputs under ``--output_dir`` (default ``bench/results``): ``bayeslora_step.csv`` and ``bayeslora_step.json``
(raw step times, settings, environment) and ``bayeslora_step.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from peft_bayes import BayesLoraConfig, kl_divergence
from peft_bayes.arguments import positive_ints, str2bool
from peft_bayes.io import write_text_atomic
from peft_bayes.kernels.sampled_lora import KERNEL_ENV, MAX_RANK, kernel_path
from peft_bayes.tiny import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer

MiB = 2**20
N_TRAIN = 1000  # N of the KL term's ``KL / N``: its value does not change the cost
STEM = "bayeslora_step"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASES = ("fp", "nf4")
KERNELS = ("reference", "triton")
NO_KERNEL = "-"  # the kernel column of PEFT's LoRA, which does not go through add_sampled_lora
# Size flags a preset fills in when they are not given. None: the tiny model's own default (4 * hidden, the
# tokenizer's vocabulary, as many KV heads as heads).
PRESETS = {
    "tiny": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": None, "intermediate_size": None}
    | {"vocab_size": None, "seq_len": 128, "batch_size": 8},
    # TinyLlama-1.1B's shape (grouped-query attention: 4 KV heads), random weights.
    "1b": {"hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4, "intermediate_size": 5632}
    | {"vocab_size": 32000, "seq_len": 512, "batch_size": 4},
}


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    name: str  # "lora", "bayeslora", "bayeslora-noflip"
    rank: int
    bayes: bool
    flipout: bool = False
    base: str = "fp"  # "fp" or "nf4"
    kernel: str = NO_KERNEL  # "reference" or "triton" for BayesLoRA

    @property
    def label(self) -> str:
        """E.g. ``fp-lora-r8``, ``nf4-triton-bayeslora-r8``: the key of its raw times in the JSON."""
        kernel = "" if self.kernel == NO_KERNEL else f"{self.kernel}-"
        return f"{self.base}-{kernel}{self.name}-r{self.rank}"


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = list(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for triton's interpreter (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size; size flags override it")
    p.add_argument("--arch", default="llama", choices=TINY_ARCHITECTURES)
    p.add_argument("--hidden_size", type=int, default=None, help="default: the preset's (tiny 256, 1b 2048)")
    p.add_argument("--num_layers", type=int, default=None, help="default: the preset's (tiny 4, 1b 22)")
    p.add_argument("--num_heads", type=int, default=None, help="default: the preset's (tiny 4, 1b 32)")
    p.add_argument("--num_kv_heads", type=int, default=None, help="llama only; default: the preset's (1b 4)")
    p.add_argument("--intermediate_size", type=int, default=None, help="MLP width; default 4 * hidden_size (1b 5632)")
    p.add_argument("--vocab_size", type=int, default=None, help="default: the tiny tokenizer's (1b 32000)")
    p.add_argument("--seq_len", type=int, default=None, help="default: the preset's (tiny 128, 1b 512)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the preset's (tiny 8, 1b 4)")
    p.add_argument("--rank", type=positive_ints, default=[8], help="LoRA rank(s), e.g. 8,16")
    p.add_argument(
        "--target_modules", default="all-linear", help="comma-separated module names; default every linear layer"
    )
    p.add_argument("--flipout", type=str2bool, default=True, help="also run BayesLoRA with flipout (true/false)")
    p.add_argument("--base", type=_choices(BASES), default=["fp"], help="base(s): fp (in --dtype), nf4; e.g. fp,nf4")
    p.add_argument(
        "--kernel",
        type=_choices(KERNELS),
        default=None,
        help="BayesLoRA path(s): reference, triton; default both on CUDA, on CPU reference (+ triton when "
        "TRITON_INTERPRET=1)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    p.add_argument("--repeats", type=int, default=3, help="blocks of --steps; the JSON holds each block's ratio")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="base model dtype, NF4 compute dtype")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = torch default (1 is steadier on a busy box)"
    )
    p.add_argument("--output_dir", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("hidden_size", "num_layers", "num_heads", "seq_len", "batch_size", "steps", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0, got {args.warmup} and {args.threads}")
    if args.num_kv_heads is not None and (args.arch != "llama" or args.num_heads % args.num_kv_heads):
        p.error(f"--num_kv_heads needs --arch llama and must divide --num_heads ({args.num_heads})")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.kernel is None:
        on_gpu = torch.device(args.device).type == "cuda"
        args.kernel = list(KERNELS) if on_gpu or triton_interpreting() else ["reference"]
    probe = torch.empty(0, device=args.device)
    for kernel in args.kernel:  # fail now, with the library's message, where a path cannot run on this device
        with kernel_env(kernel):
            try:
                kernel_path(probe)
            except RuntimeError as err:
                p.error(f"--kernel {kernel} cannot run on {args.device}: {err}")


@contextlib.contextmanager
def kernel_env(kernel: str) -> Iterator[None]:
    """Sets ``PEFT_BAYES_KERNEL`` (read by the library on every call) for the duration; ``-`` leaves it alone."""
    if kernel == NO_KERNEL:
        yield
        return
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = kernel
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNEL_ENV]
        else:
            os.environ[KERNEL_ENV] = old


def variants(ranks: list[int], flipout: bool, bases: list[str], kernels: list[str]) -> list[Variant]:
    """Per base and rank: LoRA, then BayesLoRA (flipout, no flipout) with each kernel."""
    out = []
    for base in bases:
        for r in ranks:
            out.append(Variant("lora", r, bayes=False, base=base))
            for kernel in kernels:
                if flipout:
                    out.append(Variant("bayeslora", r, bayes=True, flipout=True, base=base, kernel=kernel))
                out.append(Variant("bayeslora-noflip", r, bayes=True, flipout=False, base=base, kernel=kernel))
    return out


class BaseModels:
    """Makes fresh copies of one randomly initialised base model, full precision or NF4, on the device."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        if args.num_kv_heads is not None:
            overrides["num_key_value_heads"] = args.num_kv_heads
        self.device, self.dtype = torch.device(args.device), DTYPES[args.dtype]
        self.template = build_tiny_model(
            args.arch,
            tokenizer,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            seed=0,
            **overrides,
        ).to(self.dtype)  # on CPU; the NF4 base is loaded from a saved copy of it
        self.vocab_size = self.template.config.vocab_size
        self._tmp: tempfile.TemporaryDirectory | None = None

    def make(self, base: str) -> torch.nn.Module:
        if base == "fp":
            return copy.deepcopy(self.template).to(self.device)
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM

        from peft_bayes.models import disable_bnb_cpu_repacking, quantization_config

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-bayeslora-step-")
            self.template.save_pretrained(self._tmp.name, safe_serialization=True)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        kwargs["quantization_config"] = quantization_config(False, True, self.dtype, "nf4", double_quant=True)
        if self.device.type == "cuda":  # bitsandbytes quantises on the way to the GPU
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            kwargs["device_map"] = {"": index}
        model = AutoModelForCausalLM.from_pretrained(self._tmp.name, **kwargs)
        disable_bnb_cpu_repacking(model)  # keeps the trainable 4-bit layout on CPU
        if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
            raise RuntimeError("--base nf4: the reloaded model has no bitsandbytes Linear4bit layer")
        return model

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class Runner:
    """A PEFT model, its AdamW optimizer and a fixed batch: ``step()`` is one training step."""

    def __init__(self, variant: Variant, args: argparse.Namespace, bases: BaseModels) -> None:
        self.variant, self.device = variant, torch.device(args.device)
        base = bases.make(variant.base)
        self.base_bytes = tensor_bytes(model_tensors(base))
        targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
        common = dict(task_type="CAUSAL_LM", r=variant.rank, lora_alpha=2 * variant.rank, target_modules=targets)
        if variant.bayes:
            config = BayesLoraConfig(**common, flipout=variant.flipout, kl_schedule="constant")
        else:
            config = LoraConfig(**common)
        self.model = get_peft_model(base, config).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, bases.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        self.input_ids = ids.to(self.device)

    def loss(self) -> torch.Tensor:
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        if self.variant.bayes:
            kl_weight = self.model.active_peft_config.kl_weight
            loss = loss + kl_weight * kl_divergence(self.model) / N_TRAIN
        return loss

    def step(self) -> None:
        with kernel_env(self.variant.kernel):
            self.optimizer.zero_grad(set_to_none=True)
            self.loss().backward()
            self.optimizer.step()

    def fused_layers(self) -> int:
        """Layers whose forward went through a fused ``peft_bayes.kernels`` autograd Function, in one forward pass
        (the profiler records every custom Function's forward under its class name)."""
        from torch.profiler import ProfilerActivity, profile

        names = kernel_functions()
        with kernel_env(self.variant.kernel), profile(activities=[ProfilerActivity.CPU]) as prof:
            self.loss()
        return sum(event.name in names for event in prof.events())

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def target_names(self) -> list[str]:
        names = {name.rsplit(".", 1)[-1] for name, m in self.model.named_modules() if hasattr(m, "lora_A")}
        return sorted(names)


def kernel_functions() -> set[str]:
    """Names of the ``torch.autograd.Function`` subclasses defined in ``peft_bayes.kernels``."""
    out, todo = set(), [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("peft_bayes.kernels"):
            out.add(cls.__name__)
    return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' quantisation state (absmax, code, nested state), which is neither."""
    tensors = list(model.parameters()) + list(model.buffers())
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    while states:
        state = states.pop()
        for value in vars(state).values():
            if torch.is_tensor(value):
                tensors.append(value)
            elif hasattr(value, "absmax"):  # the nested QuantState of double quantisation
                states.append(value)
    return tensors


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
    static = tensor_bytes(model_tensors(runner.model) + state)
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


def _row(runner: Runner, t: list[list[float]], peak: dict[str, int], fused: int) -> dict[str, Any]:
    v = runner.variant
    row = {"config": v.name, "rank": v.rank, "flipout": v.flipout, "base": v.base, "kernel": v.kernel}
    row.update(label=v.label, **summarize([s for rep in t for s in rep]))
    row["repeat_median_ms"] = [statistics.median(rep) * 1000 for rep in t]
    row.update(peak, peak_mib=peak["peak_bytes"] / MiB)
    row["peak_above_base_mib"] = (peak["peak_bytes"] - runner.base_bytes) / MiB
    row["trainable_params"] = runner.trainable_params()
    row["fused_layers"] = fused
    return row


def build_rows(
    runners: list[Runner], times: list[list[list[float]]], peaks: list[dict], fused: list[int]
) -> list[dict[str, Any]]:
    """One row per configuration, with ratios against LoRA on the same base and rank, and (BayesLoRA) against the
    same configuration with the reference kernel."""
    rows = [_row(runner, t, peak, n) for runner, t, peak, n in zip(runners, times, peaks, fused)]
    for row in rows:
        same = [r for r in rows if r["base"] == row["base"] and r["rank"] == row["rank"]]
        ref = next(r for r in same if r["config"] == "lora")
        row["step_ratio"] = row["median_ms"] / ref["median_ms"]
        row["repeat_step_ratios"] = [a / b for a, b in zip(row["repeat_median_ms"], ref["repeat_median_ms"])]
        row["peak_ratio"] = row["peak_bytes"] / ref["peak_bytes"]
        row["peak_above_base_ratio"] = row["peak_above_base_mib"] / ref["peak_above_base_mib"]
        row["params_ratio"] = row["trainable_params"] / ref["trainable_params"]
        kernels = {r["kernel"]: r for r in same if r["config"] == row["config"]}
        kref = kernels.get("reference")
        if row["kernel"] == NO_KERNEL or kref is None or "triton" not in kernels:  # one kernel: nothing to compare
            row.update(step_ratio_vs_reference=None, repeat_step_ratios_vs_reference=None)
            row["peak_ratio_vs_reference"] = None
            continue
        row["step_ratio_vs_reference"] = row["median_ms"] / kref["median_ms"]
        pairs = zip(row["repeat_median_ms"], kref["repeat_median_ms"])
        row["repeat_step_ratios_vs_reference"] = [a / b for a, b in pairs]
        row["peak_ratio_vs_reference"] = row["peak_bytes"] / kref["peak_bytes"]
    return rows


def _versions() -> dict[str, str | None]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def environment(args: argparse.Namespace, runners: list[Runner]) -> dict[str, Any]:
    device = runners[0].device
    base_mib = {}
    for runner in runners:
        base_mib.setdefault(runner.variant.base, runner.base_bytes / MiB)
    env = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_modules_resolved": runners[0].target_names(),
        "base_model_mib": runners[0].base_bytes / MiB,
        "base_model_mib_by_base": base_mib,
        "kernel_env": KERNEL_ENV,
        "triton_interpret": triton_interpreting(),
        "max_fused_rank": MAX_RANK,
        **_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory_source": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler profile_memory events",
    }
    return env


def _ratio(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    s = env["settings"]
    bases = ", ".join(f"{b} {mib:.1f} MiB" for b, mib in env["base_model_mib_by_base"].items())
    kv = f" ({s['num_kv_heads']} KV)" if s.get("num_kv_heads") else ""
    head = (
        f"BayesLoRA vs LoRA training step: {s['arch']} hidden {s['hidden_size']}, {s['num_layers']} layers, "
        f"{s['num_heads']} heads{kv}, seq {s['seq_len']}, batch {s['batch_size']}, {s['dtype']} on "
        f"{env['device_name']} ({env['cpu_threads']} CPU threads), targets "
        f"{','.join(env['target_modules_resolved'])}; median of {rows[0]['n_steps']} interleaved steps; peak = torch "
        f"allocator peak during a step (base model included: {bases}).\n\n"
    )
    lines = [
        "| base | kernel | config | rank | step ms (median) | ratio vs LoRA | ratio vs reference | peak MiB "
        "| ratio vs LoRA | ratio vs reference | trainable params |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} | {r['kernel']} | {r['config']} | {r['rank']} | {r['median_ms']:.1f} ± "
            f"{r['iqr_ms'] / 2:.1f} | {r['step_ratio']:.2f} | {_ratio(r['step_ratio_vs_reference'], 2)} "
            f"| {r['peak_mib']:.1f} | {r['peak_ratio']:.3f} | {_ratio(r['peak_ratio_vs_reference'], 3)} "
            f"| {r['trainable_params']:,} |"
        )
    notes = ["± is half the IQR. Ratios: vs PEFT LoRA on the same base and rank; vs the reference kernel."]
    triton = [r for r in rows if r["kernel"] == "triton"]
    if triton:
        fused = ", ".join(sorted({str(r["fused_layers"]) for r in triton}))
        notes.append(f"Layers through the fused kernel per forward, triton rows: {fused}.")
        if env["triton_interpret"]:
            notes.append("TRITON_INTERPRET=1: triton ran in its interpreter; its times say nothing about speed.")
    return head + "\n".join(lines) + "\n\n(" + " ".join(notes) + ")\n"


def write_outputs(out_dir: Path, rows: list[dict], times: list[list[list[float]]], env: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [k for k in rows[0] if not any(isinstance(r[k], list) for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / f"{STEM}.csv", buf.getvalue())
    raw = {r["label"]: [[1000 * s for s in rep] for rep in t] for r, t in zip(rows, times)}
    payload = {**env, "rows": rows, "step_times_ms": raw}
    write_text_atomic(out_dir / f"{STEM}.json", json.dumps(payload, indent=2) + "\n")
    md_path = out_dir / f"{STEM}.md"
    write_text_atomic(md_path, markdown(rows, env))
    return md_path


def _check_fused(runners: list[Runner], fused: list[int]) -> None:
    """Warns where the kernel axis did not take effect (e.g. a layer that does not dispatch to the fused path)."""
    for runner, n in zip(runners, fused):
        v = runner.variant
        if v.kernel == "triton" and n == 0 and v.rank <= MAX_RANK:
            print(f"warning: {v.label}: no layer went through the fused kernel", file=sys.stderr)
        if v.kernel == "reference" and n:
            print(f"warning: {v.label}: {n} layers went through the fused kernel", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no save / load progress bars between the table and its warnings
    if args.threads:
        torch.set_num_threads(args.threads)
    bases = BaseModels(args, build_tokenizer())
    try:
        runners = [Runner(v, args, bases) for v in variants(args.rank, args.flipout, args.base, args.kernel)]
    finally:
        bases.close()
    del bases  # the CPU template: not needed once every runner holds its copy
    fused = [runner.fused_layers() for runner in runners]
    _check_fused(runners, fused)
    times = run_timing(runners, args.warmup, args.steps, args.repeats)
    peaks = [measure_peak(runner) for runner in runners]
    rows = build_rows(runners, times, peaks, fused)
    md_path = write_outputs(args.output_dir, rows, times, environment(args, runners))
    print(md_path.read_text(), end="")
    print(f"wrote {md_path.with_suffix('.csv')}, {md_path.with_suffix('.json')}, {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
