"""End-to-end run of bench/bench_laplace_settings.py on a tiny LLaMA with a random-B LoRA and synthetic
multiple-choice data: every curvature is fitted (the mc one per seed), both links are scored, and the table gives
mean ± std where there are several fits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from peft_bayes.data.synthetic import write_choice_data

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_laplace_settings.py"


def test_bench_laplace_settings(tmp_path, random_lora):
    base, _, lora = random_lora
    train, test = write_choice_data(str(tmp_path / "data"), n_train=6, n_test=5, seed=0)
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--base_model", base, "--adapter", lora]
    cmd += ["--fit_data", train, "--data_path", test, "--n", "5", "--choice_format", "label", "--draws", "4000"]
    cmd += ["--seeds", "1,2", "--batch_size", "3", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = json.loads((out / "laplace_settings.json").read_text())["runs"]
    keys = [(r["fisher"], r["seed"], r["link"]) for r in runs]
    assert keys == [("mc", 1, "probit"), ("mc", 1, "mc"), ("mc", 2, "probit"), ("mc", 2, "mc")] + [
        ("exact", 1, "probit"),
        ("exact", 1, "mc"),
    ]
    for r in runs:
        assert r["n"] == 5 and 0 <= r["accuracy_percent"] <= 100 and math.isfinite(r["nll_nats"])
        assert r["prior_precision"] > 0 and r["fit_seconds"] > 0
    # One fit per curvature and seed: both links share its prior precision and fit time
    for fisher, seed in {(r["fisher"], r["seed"]) for r in runs}:
        pair = [r for r in runs if (r["fisher"], r["seed"]) == (fisher, seed)]
        assert pair[0]["prior_precision"] == pair[1]["prior_precision"]
        assert pair[0]["fit_seconds"] == pair[1]["fit_seconds"]
    text = (out / "laplace_settings.md").read_text()
    assert "| mc | pairwise probit | 2 | " in text and " ± " in text.split("| mc | pairwise probit | 2 |")[1]
    assert "| exact | MC, 4,000 draws | 1 | " in text and "Command:" in text


def test_bench_laplace_settings_rejects_an_unknown_curvature():
    cmd = [sys.executable, str(SCRIPT), "--adapter", "A", "--fit_data", "F", "--data_path", "T", "--fishers", "ggn"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--fishers: unknown curvature 'ggn'" in proc.stderr.splitlines()[-1]
