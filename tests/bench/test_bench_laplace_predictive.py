"""End-to-end run of bench/bench_laplace_predictive.py on a tiny LLaMA with a random-B LoRA and a Laplace posterior
fitted on synthetic multiple-choice data: every configuration runs in its own process, the outputs are well-formed,
and the GLM predictive's probabilities do not depend on its batch size. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peft_bayes.data.prompts import Prompter
from peft_bayes.data.synthetic import write_choice_data
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import Laplace

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_laplace_predictive.py"


def _adapter_with_laplace(tmp_path, random_lora, tiny_tokenizer) -> tuple[str, str, str]:
    base, model, lora = random_lora
    train, test = write_choice_data(str(tmp_path / "data"), n_train=6, n_test=5, seed=0)
    data = load_eval_set("fit", train, None, Prompter.from_name("alpaca_short"), "label")
    laplace = Laplace(model, prior_method="fixed", prior_precision=0.5)
    laplace.fit(PairScorer(model, tiny_tokenizer, data.pairs, 3, labels=data.golds).batches())
    laplace.save(os.path.join(lora, "posterior", "laplace"))
    return base, lora, test


def test_bench_laplace_predictive(tmp_path, random_lora, tiny_tokenizer):
    base, adapter, test = _adapter_with_laplace(tmp_path, random_lora, tiny_tokenizer)
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--base_model", base, "--adapter", adapter, "--data_path", test]
    cmd += ["--n", "5", "--choice_format", "label", "--batch_size", "2", "--mc_draws", "8"]
    cmd += ["--configs", "map,glm:1,glm:3,glm-mc:2", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = json.loads((out / "laplace_predictive.json").read_text())["runs"]
    assert [r["config"] for r in runs] == ["map", "glm:1", "glm:3", "glm-mc:2"]
    assert all(r["questions"] == 5 and r["seconds"] > 0 and r["process_peak_bytes"] > 0 for r in runs)
    assert runs[1]["max_abs_dp"] == 0.0 and runs[3]["max_abs_dp"] == 0.0  # each kind's first is its reference
    assert runs[2]["max_abs_dp"] < 1e-5  # float32: one example per batch or three, the same probabilities
    text = (out / "laplace_predictive.md").read_text()
    assert "| config | seconds | x MAP | peak MiB | x MAP |" in text and "| map |" in text and "Command:" in text


def test_bench_laplace_predictive_rejects_bad_configs(tmp_path):
    for configs, message in (("glm:1", "must start with map"), ("map,glm:0", "is not map, glm:G")):
        cmd = [sys.executable, str(SCRIPT), "--adapter", "A", "--data_path", "F", "--configs", configs]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1]
        assert not (tmp_path / "out").exists()
