"""End-to-end smoke runs of bench/bench_sampled_lora.py on CPU (Triton's interpreter) at tiny shapes: the outputs
exist, are well-formed, hold every case and configuration, and their ratios agree with their times; the peak memory
(live tensors on CPU) shows the fused path keeping no per-token tensor beyond PEFT LoRA's. No timing is asserted
(speed is measured by the benchmark itself, not by tests)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_sampled_lora.py"
BASES, SHAPES, TOKENS, RANKS = ["fp", "nf4"], ["48x40", "64x32"], [16], [2, 4]
CONFIGS = ["base", "peft_lora", "bayeslora_mean", "reference_bayeslora", "fused_bayeslora", "triton_nf4_base"]
NF4_ONLY = {"triton_nf4_base"}  # the Triton NF4 product replaces bitsandbytes' base: no row on the fp base
TINY = ["--device", "cpu", "--dtype", "float32", "--reps", "2", "--warmup", "0"]
KERNEL = {"bayeslora_mean": "torch", "reference_bayeslora": "reference", "fused_bayeslora": "triton"}
KERNEL["triton_nf4_base"] = "triton"
MD_HEADER = "| base | shape | tokens | rank | config | kernel | fwd ms | bwd ms | fwd+bwd ms |"


def run_bench(out_dir: Path, *flags: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("PEFT_BAYES_KERNEL", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(SCRIPT), *TINY, *flags, "--output_dir", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _strict_json(path: Path):
    def no_constants(name):
        raise ValueError(f"{path.name} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _num(text: str) -> float:
    return math.nan if text in ("", "nan") else float(text)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def check_ratios(rows: list[dict]) -> None:
    """Every ratio and difference in a row equals the one recomputed from the times of its case."""
    case = {r["config"]: r for r in rows}
    base, lora, ref = (float(case[c]["fwdbwd_ms"]) for c in ("base", "peft_lora", "reference_bayeslora"))
    assert float(case["peft_lora"]["fwdbwd_vs_peft_lora"]) == 1.0 and float(case["base"]["fwdbwd_vs_base"]) == 1.0
    for row in rows:
        t = float(row["fwdbwd_ms"])
        assert _same(float(row["fwdbwd_vs_peft_lora"]), t / lora), row
        assert _same(float(row["fwdbwd_vs_base"]), t / base), row
        assert _same(float(row["adapter_ms"]), t - base), row
        extra = float(row["peak_mib"]) - float(case["peft_lora"]["peak_mib"])
        assert _same(float(row["extra_peak_vs_peft_lora_mib"]), extra), row
        if row["config"].startswith("fused_bayeslora"):  # its --tiles variants too
            assert _same(float(row["fwdbwd_vs_reference"]), t / ref), row
            expected = (t - base) / (ref - base) if ref > base else math.nan
            assert _same(_num(row["adapter_vs_reference"]), expected), row
        else:
            assert row["fwdbwd_vs_reference"] == row["adapter_vs_reference"] == "", row


def test_bench_sampled_lora_writes_wellformed_outputs(tmp_path):
    flags = ["--bases", ",".join(BASES), "--shapes", ",".join(SHAPES)]
    flags += ["--tokens", ",".join(map(str, TOKENS)), "--ranks", ",".join(map(str, RANKS))]
    proc = run_bench(tmp_path, *flags)

    with open(tmp_path / "sampled_lora.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [
        c for c in itertools.product(BASES, SHAPES, TOKENS, RANKS, CONFIGS) if c[0] == "nf4" or c[4] not in NF4_ONLY
    ]
    assert [(r["base"], r["shape"], int(r["tokens"]), int(r["rank"]), r["config"]) for r in rows] == expected
    for row in rows:
        for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (key, row)
        base_kernel = "bnb" if row["base"] == "nf4" and row["config"] == "base" else "torch"
        assert row["kernel"] == KERNEL.get(row["config"], base_kernel), row
        if row["config"] == "bayeslora_mean":  # same weights as peft_lora in the mean: the same layer output
            assert float(row["max_rel_diff_vs_peft_lora"]) < 1e-4, row
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault((row["base"], row["shape"], row["tokens"], row["rank"]), []).append(row)
    assert len(cases) == len(BASES) * len(SHAPES) * len(TOKENS) * len(RANKS)
    for case_rows in cases.values():
        check_ratios(case_rows)

    data = _strict_json(tmp_path / "sampled_lora.json")
    assert data["settings"]["shapes"] == SHAPES and data["settings"]["ranks"] == RANKS
    assert data["torch"] and data["triton"] and data["device_name"].startswith("cpu")
    assert data["triton_interpret"] == "1" and data["peak_memory"].startswith("peak of the live tensors")
    assert set(data["summary"]) == set(BASES) and len(data["rows"]) == len(expected)
    for row in data["rows"]:
        assert row["peak_mib"] > 0
        for phase in ("fwd", "bwd", "fwdbwd"):
            low, high = row["spread_ms"][phase]
            assert 0 < low <= row[f"{phase}_ms"] <= high, (phase, row)

    lines = (tmp_path / "sampled_lora.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(MD_HEADER))
    table = lines[header : header + 2 + len(expected)]
    assert len(table) == 2 + len(expected) and len({line.count("|") for line in table}) == 1
    assert MD_HEADER in proc.stdout


def test_bench_sampled_lora_sets_interpreter_and_takes_config_subsets(tmp_path):
    # No TRITON_INTERPRET in the environment: --device cpu sets it before the kernels are imported.
    flags = ["--bases", "fp", "--shapes", "40x24", "--tokens", "8", "--ranks", "2"]
    flags += ["--configs", "fused_bayeslora,base"]  # given out of order: rows come in the canonical order
    run_bench(tmp_path, *flags, interpret=False)
    with open(tmp_path / "sampled_lora.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["base", "fused_bayeslora"] and rows[1]["kernel"] == "triton"
    assert rows[1]["fwdbwd_vs_peft_lora"] == "" and rows[1]["fwdbwd_vs_reference"] == ""  # their baselines not run
    assert _same(float(rows[1]["fwdbwd_vs_base"]), float(rows[1]["fwdbwd_ms"]) / float(rows[0]["fwdbwd_ms"]))
    assert _strict_json(tmp_path / "sampled_lora.json")["triton_interpret"] == "1"


def test_fused_sampling_keeps_no_per_token_tensor_beyond_peft_lora(tmp_path):
    # Tokens outnumber both widths, so one tokens x width tensor (T * 128 floats) stands out from what is rank-sized
    # (h, dh, the split partials of dM and dS). The reference holds its per-token signs (tokens x d_in and tokens x r)
    # and their products: well over one such tensor above PEFT LoRA. The fused path generates them in registers and
    # adds B's product into the base output in place; it was once a whole (tokens x d_out) gradient copy or two above
    # PEFT (an in-place update of a view, which autograd's CopySlices undoes by copying), which this bound catches.
    tokens, width = 512, 128
    flags = ["--bases", "fp", "--shapes", f"{width}x{width}", "--tokens", str(tokens), "--ranks", "8"]
    run_bench(tmp_path, *flags, "--configs", "peft_lora,reference_bayeslora,fused_bayeslora")
    with open(tmp_path / "sampled_lora.csv", newline="") as f:
        extra = {r["config"]: float(r["extra_peak_vs_peft_lora_mib"]) * 2**20 for r in csv.DictReader(f)}
    one_tensor = tokens * width * 4  # float32
    assert extra["reference_bayeslora"] >= one_tensor, extra
    assert extra["fused_bayeslora"] < one_tensor / 2, extra


def test_tiles_add_rows_and_the_best_per_case(tmp_path):
    flags = ["--bases", "fp", "--shapes", "96x64", "--tokens", "40", "--ranks", "8", "--tiles", "16x16w2,32x64"]
    run_bench(tmp_path, *flags)
    with open(tmp_path / "sampled_lora.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["config"] for r in rows]
    at = names.index("fused_bayeslora")
    assert names[at : at + 3] == ["fused_bayeslora", "fused_bayeslora@16x16w2", "fused_bayeslora@32x64"], names
    assert all(r["kernel"] == "triton" for r in rows[at : at + 3])
    check_ratios(rows)
    data = _strict_json(tmp_path / "sampled_lora.json")
    assert data["settings"]["tiles"] == ["16x16w2", "32x64"]
    (best,) = data["best_tiles"]
    times = {r["config"].partition("@")[2] or "default": float(r["fwdbwd_ms"]) for r in rows[at : at + 3]}
    assert best["tiles"] == min(times, key=times.get) and _same(best["best_ms"], min(times.values()))
    assert _same(best["best_vs_default"], best["best_ms"] / times["default"])
    assert "## Best tiles of the fused BayesLoRA layer" in (tmp_path / "sampled_lora.md").read_text()


def test_tiles_that_triton_cannot_run_are_refused(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(SCRIPT), *TINY, "--tiles", "64x100", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "block_k=100 must be a power of two" in proc.stderr, proc.stderr[-500:]
    assert not list(tmp_path.iterdir())  # nothing written
