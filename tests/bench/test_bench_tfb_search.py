"""End-to-end run of bench/bench_tfb_search.py on a tiny LLaMA with a random-B LoRA and synthetic multiple-choice
anchors: every configuration runs, the outputs are well-formed, and every search finds the first one's sigma within
the tolerance (the fast paths must not change the answer). No timing is asserted."""

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
SCRIPT = ROOT / "bench" / "bench_tfb_search.py"


def test_bench_tfb_search(tmp_path, random_lora):
    base, _, lora = random_lora
    train, _ = write_choice_data(str(tmp_path / "data"), n_train=6, n_test=2, seed=0)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--base_model",
        base,
        "--adapter",
        lora,
        "--anchors",
        train,
        "--limit",
        "6",
        "--samples",
        "2",
        "--batch_size",
        "4",
        "--epsilon",
        "0.05",
        "--choice_format",
        "label",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((tmp_path / "out" / "tfb_search.json").read_text())
    runs = result["runs"]
    assert [r["config"] for r in runs] == ["batches:bisection", "scorer:bisection", "scorer:interpolation"]
    first = runs[0]
    for r in runs:
        assert r["anchors"] == 6 and r["search_seconds"] > 0 and r["n_evals"] >= 1
        assert abs(math.log(r["sigma"] / first["sigma"])) <= math.log1p(r["tolerance"])
        assert r["trace"] and len(r["trace"]) == r["n_evals"]
    assert runs[1]["n_evals"] == runs[0]["n_evals"]  # the same search on the two anchor paths
    md = (tmp_path / "out" / "tfb_search.md").read_text()
    assert "| scorer:interpolation |" in md and "Every sigma within the tolerance (0.02) of the first's: True" in md
