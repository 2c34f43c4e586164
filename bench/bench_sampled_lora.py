"""One LoRA layer's forward and backward: fused Triton sampled LoRA vs its PyTorch reference vs PEFT's LoRA.

Run (one command on a CUDA machine; CPU runs go through Triton's interpreter, tiny shapes only)::

    python bench/bench_sampled_lora.py                              # defaults below, fp and NF4 bases, bf16
    python bench/bench_sampled_lora.py --shapes 4096x4096 --tokens 2048 --ranks 16 --bases fp
    python bench/bench_sampled_lora.py --device cpu --shapes 48x40 --tokens 32 --ranks 4 --dtype float32 \\
        --reps 2 --warmup 1

Every case is one layer ``d_in x d_out`` (``--shapes``, default 4096x4096, 4096x14336, 14336x4096), an input of
``--tokens`` rows (default 512, 2048, 8192, 16384), a LoRA rank (``--ranks``, default 8, 16, 64) and a frozen base
weight that is either a plain ``nn.Linear`` in ``--dtype`` (base ``fp``) or a bitsandbytes NF4 ``Linear4bit`` with
compute dtype ``--dtype`` (base ``nf4``, QLoRA's double quantisation). All configurations of a case share the same
base layer, input ``x`` and upstream gradient ``dy``; the adapters share the same random non-zero A and B (rank r,
``lora_alpha = 2 r``, no dropout, adapter weights in ``--dtype``: PEFT's autocast of adapters to float32 is off).
The configurations (``--configs``):

- ``base``: the frozen base layer alone; backward computes the gradient of x only.
- ``peft_lora``: PEFT's own LoRA layer (``LoraConfig`` through ``get_peft_model`` on a one-Linear module; on NF4
  ``peft.tuners.lora.bnb.Linear4bit``), ``B(A x)`` in PyTorch.
- ``bayeslora_mean``: the BayesLoRA layer in mean mode (``sampling(model, False)``). Its mean pass calls PEFT's own
  ``lora_A`` / ``lora_B`` modules (so that module hooks, a Laplace fit's for one, see them as in LoRA), so this row
  measures the BayesLoRA layer's wrapper around PEFT's computation, not a kernel: it should match ``peft_lora``.
- ``reference_bayeslora``: the BayesLoRA layer sampling (fresh E and flipout signs each forward, BLoB's default
  flipout on factor A) with ``PEFT_BAYES_KERNEL=reference``: E (r x d_in) and the per-token signs (tokens x d_in,
  tokens x r) are drawn by torch and held in memory.
- ``fused_bayeslora``: the same sampling layer with ``PEFT_BAYES_KERNEL=triton``: E and signs generated in registers.
- ``triton_nf4_base`` (NF4 base only): the frozen base product through ``peft_bayes.kernels.nf4_matmul`` (codes
  dequantised inside the matmul tile) instead of bitsandbytes' dequantise + matmul; its ``vs base`` ratio answers
  whether that kernel should take over the 4-bit base product.

The layer module itself is called (not the ``PeftModel``), with autograd on and x requiring grad. For each
configuration:

- **fwd ms**: ``y = layer(x)`` (the graph is recorded, as in training). **bwd ms**: ``y.backward(dy,
  retain_graph=True)`` on one recorded forward. **fwd+bwd ms**: ``layer(x).backward(dy)``. Backward computes the
  gradients of x and of the adapter parameters the forward used (``lora_A``, ``lora_B``, and ``bayeslora_rho`` when
  sampling; the base is frozen); they are set to None before every run. On CUDA: the median of
  ``triton.testing.do_bench`` (CUDA events, L2 cache cleared before each run, ``--warmup_ms`` / ``--rep_ms``); on
  CPU: the median of ``--reps`` ``time.perf_counter`` runs after ``--warmup`` untimed ones. The JSON keeps the 20th
  and 80th percentiles too.
- **peak MiB**: what one fwd+bwd allocates at its peak (saved activations, noise, output, gradients), not the
  weights or inputs. On CUDA ``torch.cuda.max_memory_allocated`` minus the allocation just before the pass; on CPU
  the peak of the live tensors the pass's operations create (``bench/live_memory.py``: the same count without a
  caching allocator, so a CPU run at tiny shapes shows how many tokens x width tensors each path keeps).
- **ratios** (of the fwd+bwd medians, same case, same run): vs ``peft_lora``, vs ``base``; for ``fused_bayeslora``
  vs ``reference_bayeslora``, and the same for the *adapter part* = config time - base time (the cost the adapter
  adds on top of the frozen layer; NaN where the reference's adapter part is not positive). **extra peak MiB**:
  peak - ``peft_lora``'s peak. ``bayeslora_mean`` also reports its output's max relative difference from
  ``peft_lora`` (same weights, so it should be at rounding level: a check that the layers agree).
- **kernel**: which path ran: ``triton``, ``reference`` where the fused path does not apply (rank > its maximum),
  ``torch`` for PEFT's modules, ``bnb`` for the bitsandbytes base alone.

Outputs under ``--output_dir`` (default ``bench/results``): ``sampled_lora.csv`` (one row per case and
configuration), ``sampled_lora.json`` (rows with spreads, settings, environment: torch, triton, bitsandbytes, peft,
GPU) and ``sampled_lora.md`` (a summary of geometric-mean ratios and the full table; also printed). On CPU the
fused kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which this script sets before anything imports
the kernels), so CPU times check that the benchmark runs, they do not measure the kernels.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _device_flag(argv: list[str]) -> str:
    """The value of ``--device`` in ``argv`` (``auto`` if absent), read before argparse runs."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "auto"


import torch  # noqa: E402

# The fused kernels run on CPU tensors only in Triton's interpreter, chosen when the kernels are decorated (when
# peft_bayes.kernels is imported), so the variable is set before that import.
_DEVICE = _device_flag(sys.argv[1:])
if _DEVICE == "cpu" or (_DEVICE == "auto" and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from live_memory import LivePeak  # noqa: E402  (bench/, beside this script)
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from peft_bayes import BayesLoraConfig, sampling  # noqa: E402
from peft_bayes.arguments import positive_ints  # noqa: E402
from peft_bayes.io import write_text_atomic  # noqa: E402
from peft_bayes.kernels import sampled_lora  # noqa: E402
from peft_bayes.kernels.nf4_matmul import nf4_matmul  # noqa: E402
from peft_bayes.kernels.sampled_lora import Tiles, tile_sizes  # noqa: E402
from peft_bayes.models import disable_bnb_cpu_repacking  # noqa: E402

STEM = "sampled_lora"
MiB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASES = ("fp", "nf4")
PHASES = ("fwd", "bwd", "fwdbwd")
DIFF = "bayeslora_mean max rel diff vs peft_lora"


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration: which layer, which kernel path, which sampling mode."""

    name: str
    layer: str  # "base", "lora" (PEFT), "bayes" (BayesLoRA) or "nf4_triton" (the NF4 base through our kernel)
    kernel: str | None = None  # PEFT_BAYES_KERNEL while it runs
    sample: bool | None = None  # BayesLoRA: fresh draws (True) or the posterior mean (False)
    tiles: Tiles | None = None  # the fused kernels' tile sizes (None: their defaults)


CONFIGS = {
    c.name: c
    for c in (
        Config("base", "base"),
        Config("peft_lora", "lora"),
        Config("bayeslora_mean", "bayes", kernel="triton", sample=False),
        Config("reference_bayeslora", "bayes", kernel="reference", sample=True),
        Config("fused_bayeslora", "bayes", kernel="triton", sample=True),
        Config("triton_nf4_base", "nf4_triton"),  # nf4 base only: is our dequantise-in-the-tile matmul faster?
    )
}


class TritonNf4Base(nn.Module):
    """The frozen NF4 base layer's product through ``peft_bayes.kernels.nf4_matmul`` instead of bitsandbytes."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x, self.base.weight, self.base.bias)


@dataclass(frozen=True)
class Case:
    base: str  # "fp" or "nf4"
    d_in: int
    d_out: int
    tokens: int
    rank: int


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected shapes like 4096x14336 (d_in x d_out), got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return [n for n in allowed if n in names]  # canonical order

    return parse


TILES_HELP = (
    "extra fused_bayeslora rows with other tile sizes, e.g. 32x64,64x128w8 (BLOCK_TxBLOCK_K[wWARPS]); each row is "
    "named fused_bayeslora@TILES and the markdown adds the best per case"
)


def _tiles(text: str) -> list[Tiles]:
    try:
        return [Tiles.parse(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def configs_of(args: argparse.Namespace) -> list[Config]:
    """``--configs`` in order, each ``--tiles`` variant right after ``fused_bayeslora``'s place."""
    out = []
    for name in CONFIGS:
        if name in args.configs:
            out.append(CONFIGS[name])
        if name == "fused_bayeslora":
            out += [Config(f"{name}@{t}", "bayes", kernel="triton", sample=True, tiles=t) for t in args.tiles]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_shapes, default=_shapes("4096x4096,4096x14336,14336x4096"), help="d_inxd_out")
    p.add_argument("--tokens", type=positive_ints, default=[512, 2048, 8192, 16384], help="rows of x, e.g. 512,2048")
    p.add_argument("--ranks", type=positive_ints, default=[8, 16, 64], help="LoRA ranks, e.g. 8,16")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="x, base / compute and adapter dtype")
    p.add_argument("--bases", type=_names(BASES), default=list(BASES), help="fp (nn.Linear), nf4 (bnb Linear4bit)")
    p.add_argument("--configs", type=_names(tuple(CONFIGS)), default=list(CONFIGS), help="subset of the configs")
    p.add_argument("--tiles", type=_tiles, default=[], help=TILES_HELP)
    p.add_argument("--reps", type=int, default=10, help="CPU: timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="CPU: untimed runs first")
    p.add_argument("--rep_ms", type=float, default=100, help="CUDA: do_bench's timed budget per measurement")
    p.add_argument("--warmup_ms", type=float, default=25, help="CUDA: do_bench's warm-up budget")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if args.reps <= 0 or args.warmup < 0 or args.rep_ms <= 0 or args.warmup_ms < 0:
        p.error("--reps, --rep_ms must be positive and --warmup, --warmup_ms >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    if args.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("--device cpu needs TRITON_INTERPRET=1 before the kernels are imported (pass --device cpu on argv)")
    return args


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class OneLinear(nn.Module):
    """A module holding one Linear, the target of ``get_peft_model``."""

    def __init__(self, proj: nn.Module, quantized: bool) -> None:
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = quantized  # PEFT dispatches its bnb 4-bit LoRA layer on this flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_base(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The frozen base layer: ``nn.Linear`` in ``dtype`` or an NF4 ``Linear4bit`` quantized from the same weight."""
    gen = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(case.d_out, case.d_in, generator=gen, device=device) / math.sqrt(case.d_in)
    if case.base == "fp":
        layer = nn.Linear(case.d_in, case.d_out, bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(weight)
    else:
        layer = bnb.nn.Linear4bit(case.d_in, case.d_out, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(
            weight.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        layer = layer.to(device)  # quantizes on the move
        disable_bnb_cpu_repacking(layer)  # bnb's CPU inference repacking breaks small shapes and has no backward
    del weight
    return layer.requires_grad_(False)


def make_adapter(base: nn.Module, case: Case, bayes: bool, dtype: torch.dtype, seed: int) -> nn.Module:
    """The adapted layer (PEFT LoRA or BayesLoRA) around ``base``, with A and B drawn from ``seed``."""
    common = dict(r=case.rank, lora_alpha=2 * case.rank, lora_dropout=0.0, target_modules=["proj"])
    common.update(init_lora_weights=False)  # A and B are overwritten below
    config = BayesLoraConfig(**common) if bayes else LoraConfig(**common)
    model = get_peft_model(OneLinear(base, case.base == "nf4"), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    device = layer.lora_A["default"].weight.device
    gen = torch.Generator(device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
        a = torch.randn(case.rank, case.d_in, generator=gen, device=device) / math.sqrt(case.d_in)
        b = torch.randn(case.d_out, case.rank, generator=gen, device=device) / math.sqrt(case.rank)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer.train()


@contextmanager
def config_mode(config: Config, layer: nn.Module) -> Iterator[None]:
    """``PEFT_BAYES_KERNEL``, the BayesLoRA sampling mode and the tile sizes of ``config`` for the block."""
    before = os.environ.get(sampled_lora.KERNEL_ENV)
    if config.kernel is not None:
        os.environ[sampled_lora.KERNEL_ENV] = config.kernel
    try:
        with ExitStack() as stack:
            if config.sample is not None:
                stack.enter_context(sampling(layer, config.sample))
            if config.tiles is not None:
                stack.enter_context(tile_sizes(config.tiles))
            yield
    finally:
        if before is None:
            os.environ.pop(sampled_lora.KERNEL_ENV, None)
        else:
            os.environ[sampled_lora.KERNEL_ENV] = before


def kernel_used(config: Config, case: Case, x: torch.Tensor) -> str:
    """What computes the layer: the base alone (``torch`` / ``bnb``), PEFT's LoRA (``torch``), or the path
    ``add_sampled_lora`` takes for a BayesLoRA config (call inside ``config_mode``)."""
    if config.layer == "base":
        return "bnb" if case.base == "nf4" else "torch"
    if config.layer == "lora" or config.sample is False:  # the mean pass calls PEFT's lora_A / lora_B
        return "torch"
    if config.layer == "nf4_triton":
        return "triton"
    return "triton" if sampled_lora.uses_fused_path(x, case.rank) else "reference"


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


def _clear(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_ms(fn: Callable[[], Any], grads: list[torch.Tensor], args: argparse.Namespace) -> list[float]:
    """(p20, median, p80) of ``fn``'s time in ms; the ``.grad`` of ``grads`` is None before every run."""
    if args.device.type == "cuda":
        q = triton.testing.do_bench(
            fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grads, quantiles=[0.2, 0.5, 0.8]
        )
        return [float(v) for v in q]
    for _ in range(args.warmup):
        _clear(grads)
        fn()
    times = []
    for _ in range(args.reps):
        _clear(grads)
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    if len(times) == 1:
        return times * 3
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [q[1], statistics.median(times), q[7]]


def peak_bytes(fn: Callable[[], Any], grads: list[torch.Tensor], device: torch.device) -> int:
    """Bytes ``fn`` allocates at its peak above the allocation before it: the CUDA allocator's count on CUDA, the
    live tensors its operations create elsewhere (``LivePeak``)."""
    _clear(grads)
    if device.type != "cuda":
        with LivePeak() as live:
            fn()
        _clear(grads)
        return live.bytes
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _clear(grads)
    return peak


def _time_backward(
    layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, grads: list[torch.Tensor], args: argparse.Namespace
) -> list[float]:
    """Backward alone: one recorded forward, its graph kept (``retain_graph``) and freed on return."""
    y = layer(x)
    return time_ms(lambda: y.backward(dy, retain_graph=True), grads, args)


def measure(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """fwd, bwd, fwd+bwd times and the fwd+bwd peak of ``layer`` on ``x`` with upstream gradient ``dy``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = [x, *params]
    out: dict[str, Any] = {"adapter_params": sum(p.numel() for p in params)}
    spread = {"fwd": time_ms(lambda: layer(x), grads, args)}
    spread["bwd"] = _time_backward(layer, x, dy, grads, args)
    spread["fwdbwd"] = time_ms(lambda: layer(x).backward(dy), grads, args)
    _clear(grads)
    for phase in PHASES:
        out[f"{phase}_ms"] = spread[phase][1]
    peak = peak_bytes(lambda: layer(x).backward(dy), grads, args.device)
    out["peak_mib"] = peak / MiB
    out["spread_ms"] = {phase: [spread[phase][0], spread[phase][2]] for phase in PHASES}
    return out


def run_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per configuration of ``case``, each with its raw measurements (ratios come later)."""
    dtype, device = DTYPES[args.dtype], args.device
    base = make_base(case, dtype, device, args.seed)
    # The Triton NF4 product replaces bitsandbytes' base: it only exists on the nf4 base.
    configs = [c for c in configs_of(args) if case.base == "nf4" or c.layer != "nf4_triton"]
    layers: dict[str, nn.Module] = {"base": base, "nf4_triton": TritonNf4Base(base)}
    if any(c.layer == "lora" for c in configs):
        layers["lora"] = make_adapter(base, case, bayes=False, dtype=dtype, seed=args.seed)
    if any(c.layer == "bayes" for c in configs):
        layers["bayes"] = make_adapter(base, case, bayes=True, dtype=dtype, seed=args.seed)
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    x = torch.randn(case.tokens, case.d_in, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(case.tokens, case.d_out, generator=gen, device=device, dtype=dtype)
    lora_out = None
    if "lora" in layers:
        with torch.no_grad():
            lora_out = layers["lora"](x).float()
    rows = []
    for config in configs:
        name = config.name
        layer = layers[config.layer]
        with config_mode(config, layer):
            row = {"base": case.base, "shape": f"{case.d_in}x{case.d_out}", "d_in": case.d_in, "d_out": case.d_out}
            row.update(tokens=case.tokens, rank=case.rank, dtype=args.dtype, config=name)
            row["kernel"] = kernel_used(config, case, x)
            row.update(measure(layer, x, dy, args))
            if name == "bayeslora_mean" and lora_out is not None:
                with torch.no_grad():
                    diff = (layer(x).float() - lora_out).abs().max() / lora_out.abs().max()
                row["max_rel_diff_vs_peft_lora"] = float(diff)
        rows.append(row)
    del layers, base, x, dy, lora_out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------------------
# Ratios, summary, outputs
# --------------------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / b if b > 0 else math.nan


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of fwd+bwd medians within each case (same base, shape, tokens, rank)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["base"], row["shape"], row["tokens"], row["rank"]), {})[row["config"]] = row
    for group in cases.values():
        time_of = {name: r["fwdbwd_ms"] for name, r in group.items()}
        lora, base, ref = group.get("peft_lora"), time_of.get("base"), time_of.get("reference_bayeslora")
        for name, row in group.items():
            row["fwdbwd_vs_peft_lora"] = _ratio(row["fwdbwd_ms"], lora and lora["fwdbwd_ms"])
            row["fwdbwd_vs_base"] = _ratio(row["fwdbwd_ms"], base)
            row["adapter_ms"] = None if base is None else row["fwdbwd_ms"] - base
            extra = None if lora is None else row["peak_mib"] - lora["peak_mib"]
            row["extra_peak_vs_peft_lora_mib"] = extra
            row["fwdbwd_vs_reference"] = row["adapter_vs_reference"] = None
            if name.startswith("fused_bayeslora") and ref is not None:
                row["fwdbwd_vs_reference"] = _ratio(row["fwdbwd_ms"], ref)
                if base is not None:
                    row["adapter_vs_reference"] = _ratio(row["fwdbwd_ms"] - base, ref - base)


def _geomean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


SUMMARY = (  # (label, config, row key): geometric mean over the cases of one base
    ("fused_bayeslora / reference_bayeslora", "fused_bayeslora", "fwdbwd_vs_reference"),
    ("same, adapter part", "fused_bayeslora", "adapter_vs_reference"),
    ("fused_bayeslora / peft_lora", "fused_bayeslora", "fwdbwd_vs_peft_lora"),
    ("reference_bayeslora / peft_lora", "reference_bayeslora", "fwdbwd_vs_peft_lora"),
    ("bayeslora_mean / peft_lora", "bayeslora_mean", "fwdbwd_vs_peft_lora"),
    ("peft_lora / base", "peft_lora", "fwdbwd_vs_base"),
    ("triton NF4 base / bitsandbytes NF4 base", "triton_nf4_base", "fwdbwd_vs_base"),
)


def summarize(rows: list[dict[str, Any]], bases: list[str]) -> dict[str, dict[str, float | None]]:
    """Per base: the geometric mean over cases of each SUMMARY ratio, and bayeslora_mean's worst output difference."""
    out = {}
    for base in bases:
        mine = [r for r in rows if r["base"] == base]
        entry = {label: _geomean([r.get(key) for r in mine if r["config"] == cfg]) for label, cfg, key in SUMMARY}
        diffs = [r["max_rel_diff_vs_peft_lora"] for r in mine if "max_rel_diff_vs_peft_lora" in r]
        entry[DIFF] = max(diffs) if diffs else None
        out[base] = entry
    return out


def best_tiles(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case with ``--tiles`` rows: the fastest fused BayesLoRA tiles (fwd+bwd median) against the default."""
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["config"].startswith("fused_bayeslora"):
            cases.setdefault((row["base"], row["shape"], row["tokens"], row["rank"]), []).append(row)
    out = []
    for (base, shape, tokens, rank), candidates in cases.items():
        if all(r["config"] == "fused_bayeslora" for r in candidates):
            continue  # no --tiles row in this case
        best = min(candidates, key=lambda r: r["fwdbwd_ms"])
        default = next((r for r in candidates if r["config"] == "fused_bayeslora"), None)
        entry = {"base": base, "shape": shape, "tokens": tokens, "rank": rank}
        entry["tiles"] = best["config"].partition("@")[2] or "default"
        entry.update(best_ms=best["fwdbwd_ms"], default_ms=default and default["fwdbwd_ms"])
        entry["best_vs_default"] = _ratio(best["fwdbwd_ms"], entry["default_ms"])
        entry["best_vs_peft_lora"] = best["fwdbwd_vs_peft_lora"]
        out.append(entry)
    return out


def _tiles_table(best: list[dict[str, Any]]) -> list[str]:
    if not best:
        return []
    lines = [
        "\n## Best tiles of the fused BayesLoRA layer (fwd+bwd; BLOCK_TxBLOCK_K[wWARPS]; default: the kernels' own)\n",
        "| base | shape | tokens | rank | best tiles | best ms | default ms | best / default | best / peft_lora |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for b in best:
        cells = [b["base"], b["shape"], b["tokens"], b["rank"], b["tiles"], _fmt(b["best_ms"]), _fmt(b["default_ms"])]
        cells += [_fmt(b["best_vs_default"]), _fmt(b["best_vs_peft_lora"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.type == "cuda"
    settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    settings["shapes"] = [f"{a}x{b}" for a, b in args.shapes]
    settings["tiles"] = [str(t) for t in args.tiles]
    return {
        "settings": settings,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bnb.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "cuda": torch.version.cuda if cuda else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "timer": "triton.testing.do_bench median (CUDA events)" if cuda else "time.perf_counter median",
        "peak_memory": "torch.cuda.max_memory_allocated - allocated before" if cuda else LIVE,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


LIVE = "peak of the live tensors the pass creates (bench/live_memory.py)"
CPU_NOTE = f"{LIVE}. CPU: the fused kernels run in Triton's interpreter, so times mean nothing."
CUDA_NOTE = "CUDA allocator peak during one fwd+bwd above the level before it."


def markdown(rows: list[dict[str, Any]], summary: dict, env: dict[str, Any], best: list[dict[str, Any]]) -> str:
    s = env["settings"]
    cpu = s["device"] == "cpu"
    head = [
        "# Sampled LoRA layer: fused Triton vs reference vs PEFT LoRA\n",
        f"{s['dtype']} on {env['device_name']}; torch {env['torch']}, triton {env['triton']}, bitsandbytes "
        f"{env['bitsandbytes']}, peft {env['peft']}. Times: {env['timer']}; fwd+bwd = forward + backward to x and "
        "the adapter parameters (base frozen). Peak: " + (CPU_NOTE if cpu else CUDA_NOTE) + "\n",
        "## Summary (geometric mean over shapes x tokens x ranks of fwd+bwd ratios)\n",
        "| base | " + " | ".join(label for label, _, _ in SUMMARY) + f" | {DIFF} |",
        "|---|" + "---:|" * (len(SUMMARY) + 1),
    ]
    for base, entry in summary.items():
        cells = [_fmt(entry[label]) for label, _, _ in SUMMARY]
        diff = entry[DIFF]
        cells.append("n/a" if diff is None else f"{diff:.1e}")
        head.append(f"| {base} | " + " | ".join(cells) + " |")
    table = [
        "\n## All cases (adapter = fwd+bwd - base's fwd+bwd; ratios of fwd+bwd medians)\n",
        "| base | shape | tokens | rank | config | kernel | fwd ms | bwd ms | fwd+bwd ms | vs peft_lora | vs base "
        "| adapter ms | vs reference | adapter vs reference | peak MiB | extra peak vs peft_lora MiB |",
        "|---|---|---:|---:|---|---|" + "---:|" * 10,
    ]
    for r in rows:
        cells = [r["base"], r["shape"], r["tokens"], r["rank"], r["config"], r["kernel"]]
        cells += [_fmt(r[f"{p}_ms"]) for p in PHASES]
        cells += [_fmt(r[k]) for k in ("fwdbwd_vs_peft_lora", "fwdbwd_vs_base", "adapter_ms")]
        cells += [_fmt(r[k]) for k in ("fwdbwd_vs_reference", "adapter_vs_reference")]
        cells += [_fmt(r["peak_mib"], 1), _fmt(r["extra_peak_vs_peft_lora_mib"], 1)]
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(head + table + _tiles_table(best)) + "\n"


def _json_safe(value: Any) -> Any:
    """NaN / inf become null: the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out_dir: Path, rows: list[dict], summary: dict, env: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, dict)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / f"{STEM}.csv", buf.getvalue())
    best = best_tiles(rows)
    payload = _json_safe({**env, "summary": summary, "best_tiles": best, "rows": rows})
    write_text_atomic(out_dir / f"{STEM}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    md_path = out_dir / f"{STEM}.md"
    write_text_atomic(md_path, markdown(rows, summary, env, best))
    return md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [
        Case(base, d_in, d_out, tokens, rank)
        for base in args.bases
        for d_in, d_out in args.shapes
        for tokens in args.tokens
        for rank in args.ranks
    ]
    rows = []
    env = environment(args)
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        rows += run_case(case, args)
        add_ratios(rows)  # the outputs so far, after every case: a run stopped by a time limit keeps what it measured
        md_path = write_outputs(args.output_dir, rows, summarize(rows, args.bases), env)
    print(md_path.read_text(), end="")
    print(f"wrote {md_path.with_suffix('.csv')}, {md_path.with_suffix('.json')}, {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
