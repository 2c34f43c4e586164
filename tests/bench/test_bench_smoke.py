"""End-to-end smoke run of bench/bench_bayeslora_step.py at the tiniest settings, over every axis (fp and NF4 base,
reference and fused Triton kernel, the latter in triton's interpreter): the outputs exist and are well-formed, and
the kernel axis took effect. No timing is asserted (speed is measured by the benchmark itself, not by tests)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_bayeslora_step.py"
TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--seq_len", "8", "--batch_size", "2"]
TINY += ["--rank", "2,4", "--steps", "2", "--warmup", "1", "--repeats", "2", "--device", "cpu", "--threads", "1"]
TINY += ["--base", "fp,nf4", "--kernel", "reference,triton"]
# (base, kernel, config) per rank, in the order of the rows
POINTS = [("lora", "-")] + [(c, k) for k in ("reference", "triton") for c in ("bayeslora", "bayeslora-noflip")]
MD_HEADER = (
    "| base | kernel | config | rank | step ms (median) | ratio vs LoRA | ratio vs reference | peak MiB "
    "| ratio vs LoRA | ratio vs reference | trainable params |"
)
N_TARGETS = 7  # q k v o gate up down in the one block


def test_bench_bayeslora_step_writes_wellformed_outputs(tmp_path):
    # TRITON_INTERPRET=1 before triton is imported: the fused kernel runs on CPU tensors, in the interpreter.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "1"}
    env.pop("PEFT_BAYES_KERNEL", None)
    cmd = [sys.executable, str(SCRIPT), *TINY, "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(tmp_path / "bayeslora_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    want = [(b, k, c, r) for b in ("fp", "nf4") for r in (2, 4) for c, k in POINTS]
    assert [(r["base"], r["kernel"], r["config"], int(r["rank"])) for r in rows] == want
    for row in rows:
        for key in ("median_ms", "iqr_ms", "step_ratio", "peak_mib", "peak_ratio"):
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (key, row)
        assert float(row["peak_mib"]) > 0 and int(row["n_steps"]) == 4
        # the kernel axis is real: the fused autograd Function ran in every adapted layer, and only on triton rows
        assert int(row["fused_layers"]) == (N_TARGETS if row["kernel"] == "triton" else 0), row
    for row in rows:
        same = [r for r in rows if (r["base"], r["rank"]) == (row["base"], row["rank"])]
        lora = next(r for r in same if r["config"] == "lora")
        if row["config"] == "lora":
            assert float(row["step_ratio"]) == 1.0 and float(row["peak_ratio"]) == 1.0
            assert row["step_ratio_vs_reference"] == "" and row["peak_ratio_vs_reference"] == ""
            continue
        # rho doubles the Bayesian factor A: r * d_in more parameters per adapted layer
        assert int(row["trainable_params"]) > int(lora["trainable_params"])
        ref = next(r for r in same if r["config"] == row["config"] and r["kernel"] == "reference")
        want_ratio = float(row["median_ms"]) / float(ref["median_ms"])
        assert math.isclose(float(row["step_ratio_vs_reference"]), want_ratio, rel_tol=1e-9)
    # the NF4 base is smaller than the full-precision one (packed weights), the adapters the same
    fp, nf4 = (next(r for r in rows if r["base"] == b and r["config"] == "lora") for b in ("fp", "nf4"))
    assert int(nf4["static_bytes"]) < int(fp["static_bytes"])
    assert nf4["trainable_params"] == fp["trainable_params"]

    data = json.loads((tmp_path / "bayeslora_step.json").read_text())
    assert len(data["rows"]) == len(want) and data["settings"]["rank"] == [2, 4]
    assert data["settings"]["base"] == ["fp", "nf4"] and data["settings"]["kernel"] == ["reference", "triton"]
    assert data["triton_interpret"] is True
    assert set(data["base_model_mib_by_base"]) == {"fp", "nf4"}
    assert set(data["target_modules_resolved"]) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    assert (
        set(data["step_times_ms"]) == {r["label"] for r in rows} and "nf4-triton-bayeslora-r4" in data["step_times_ms"]
    )
    for times in data["step_times_ms"].values():
        assert [len(rep) for rep in times] == [2, 2] and all(t > 0 for rep in times for t in rep)
    for row in data["rows"]:
        assert len(row["repeat_step_ratios"]) == 2
        assert (row["repeat_step_ratios_vs_reference"] is None) == (row["config"] == "lora")

    md = (tmp_path / "bayeslora_step.md").read_text()
    lines = md.splitlines()
    table = lines[lines.index(MD_HEADER) :]
    assert [line.count("|") for line in table[: 2 + len(want)]] == [12] * (2 + len(want))
    assert MD_HEADER in proc.stdout
