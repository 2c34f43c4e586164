"""End-to-end smoke run of bench/bench_bayeslora_step.py at the tiniest settings: the outputs exist and are
well-formed. No timing is asserted (speed is measured by the benchmark itself, not by tests)."""

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
TINY += ["--rank", "2,4", "--steps", "2", "--warmup", "1", "--repeats", "2", "--device", "cpu"]
CONFIGS = ["lora", "bayeslora", "bayeslora-noflip"]
MD_HEADER = "| config | rank | step ms (median) | ratio vs LoRA | peak MiB | ratio vs LoRA | trainable params |"


def test_bench_bayeslora_step_writes_wellformed_outputs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), *TINY, "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(tmp_path / "bayeslora_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["config"], int(r["rank"])) for r in rows] == [(c, r) for r in (2, 4) for c in CONFIGS]
    for row in rows:
        for key in ("median_ms", "iqr_ms", "step_ratio", "peak_mib", "peak_ratio"):
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (key, row)
        assert float(row["peak_mib"]) > 0 and int(row["n_steps"]) == 4
    lora = {int(r["rank"]): r for r in rows if r["config"] == "lora"}
    for row in rows:
        ref = lora[int(row["rank"])]
        if row["config"] == "lora":
            assert float(row["step_ratio"]) == 1.0 and float(row["peak_ratio"]) == 1.0
        else:  # rho doubles the Bayesian factor A: r * d_in more parameters per adapted layer
            assert int(row["trainable_params"]) > int(ref["trainable_params"])

    data = json.loads((tmp_path / "bayeslora_step.json").read_text())
    assert len(data["rows"]) == 6 and data["settings"]["rank"] == [2, 4]
    assert set(data["target_modules_resolved"]) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    for times in data["step_times_ms"].values():
        assert [len(rep) for rep in times] == [2, 2] and all(t > 0 for rep in times for t in rep)

    md = (tmp_path / "bayeslora_step.md").read_text()
    lines = md.splitlines()
    table = lines[lines.index(MD_HEADER) :]
    assert [line.count("|") for line in table[:8]] == [8] * 8
    assert MD_HEADER in proc.stdout
