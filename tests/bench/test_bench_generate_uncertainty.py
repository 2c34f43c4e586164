"""bench/bench_generate_uncertainty.py end to end on a tiny LLaMA with a two-member ensemble of random LoRAs:
both modes run, write their rows (a rerun replaces its own row) and report finite numbers. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_bayes.data.synthetic import make_arithmetic_problems

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_generate_uncertainty.py"


def _run(*argv, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == rc, proc.stderr[-3000:]
    return proc


def test_cost_and_auroc_rows(tmp_path, random_lora):
    base, _, first = random_lora
    torch.manual_seed(1)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(tmp_path / "second")
    for task, seed in (("ARC-Easy", 2), ("gsm8k", 3)):
        (tmp_path / "data" / task).mkdir(parents=True)
        (tmp_path / "data" / task / "test.json").write_text(json.dumps(make_arithmetic_problems(3, seed=seed)))
    model = ["--base_model", base, "--adapter", first, "--members", tmp_path / "second", "--posterior", "ensemble",
             "--output_dir", tmp_path / "out", "--prompt_template", "alpaca_short"]  # fmt: skip
    _run("--mode", "cost", "--label", "ens", "--answer_tokens", 5, "--repeats", 1, *model)
    cost = json.loads((tmp_path / "out" / "generate_uncertainty_cost.json").read_text())["rows"]["ens"]["row"]
    assert cost["samples"] == 2 and cost["batched"] is True and cost["answer_tokens"] == 5
    assert all(cost[k] > 0 for k in ("generate_s", "token_pass_s", "samples_batched_s", "samples_one_by_one_s"))
    for label in ("ens", "ens", "again"):  # the rerun of "ens" replaces its row
        _run("--mode", "auroc", "--label", label, "--n", 3, "--data_dir", tmp_path / "data", "--max_new_tokens", 4,
             *model)  # fmt: skip
    rows = json.loads((tmp_path / "out" / "generate_uncertainty_auroc.json").read_text())["rows"]
    assert list(rows) == ["ens", "again"]
    row = rows["ens"]["row"]
    assert len(row["scores"]["id"]) == len(row["scores"]["ood"]) == 3
    assert all(0 <= row[f"AUROC {k}"] <= 1 for k in ("mi_mean", "mi_sum", "disagreement", "entropy_mean"))
    assert all(math.isfinite(s["mi_mean"]) and s["mi_mean"] >= 0 for s in row["scores"]["id"] + row["scores"]["ood"])
    table = (tmp_path / "out" / "generate_uncertainty_auroc.md").read_text().splitlines()
    assert (
        table[0].startswith("| row | samples | batched |") and sum(line.startswith("| ens |") for line in table) == 1
    )
    # generate.py's checks answer in one line, and the rows already written stay
    bad = _run("--mode", "auroc", "--label", "bad", "--n", 3, "--data_dir", tmp_path / "data", "--samples", 8, *model,
               rc=2)  # fmt: skip
    errors = [line for line in bad.stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert errors == ["error: --samples 8: the ensemble has 2 members (one pass each); use --samples 2 or fewer"]
    assert list(json.loads((tmp_path / "out" / "generate_uncertainty_auroc.json").read_text())["rows"]) == list(rows)
