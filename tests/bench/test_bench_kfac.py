"""Smoke run of bench/bench_kfac.py at the tiniest settings, every section: the outputs exist and are well-formed,
the kernel axis took effect (the triton rows ran the Triton statistics kernels, in the interpreter), the memory
table is the computed one and the low-rank comparison ran both factor kinds. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_kfac.py"


def test_bench_kfac_writes_wellformed_outputs(tmp_path):
    from peft_bayes.data.synthetic import make_choice_problems
    from peft_bayes.posterior.lowrank import factor_memory, llama7b_lora_shapes

    test_path = tmp_path / "test.json"
    test_path.write_text(json.dumps(make_choice_problems(4, seed=1, n_options=4)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PEFT_BAYES_KERNEL", None)
    cmd = [sys.executable, str(SCRIPT), "--n", "4", "--batch_size", "2", "--repeats", "1", "--kernels",
           "reference,triton", "--kfac_rank", "4", "--sections", "pass,memory,compare", "--test_path",
           str(test_path), "--n_test", "4", "--output_dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((tmp_path / "kfac_pass_memory_compare.json").read_text())
    passes = result["pass"]
    assert list(passes) == [
        "gradient pass",
        "K-FAC pass, reference, dense",
        "K-FAC pass, reference, low-rank (rank 4)",
        "K-FAC pass, triton, dense",
        "K-FAC pass, triton, low-rank (rank 4)",
    ]
    assert passes["gradient pass"]["ratio"] == 1.0
    for name, row in passes.items():
        assert len(row["seconds"]) == 1 and math.isfinite(row["ratio"]) and row["ratio"] > 0, name
        kernel = name.split(", ")[1] if name != "gradient pass" else None
        assert row["kernel_path"] == kernel, name  # PEFT_BAYES_KERNEL took effect
    shapes = llama7b_lora_shapes(8, ("q_proj", "v_proj"))
    assert [r["bytes"] for r in result["memory"]] == [factor_memory(shapes)] + [
        factor_memory(shapes, k) for k in (64, 128, 256)
    ]
    full, low = result["compare"]
    assert full["block_kinds"] == ["kron"] and low["block_kinds"] == ["kron_lowrank"]
    assert 0 < low["captured_mass_min"] <= 1 and full["captured_mass_min"] == 1.0
    for row in (full, low):
        assert math.isfinite(row["lml"]) and 0 <= row["acc"] <= 100 and 0 <= row["ece"] <= 100
    assert low["lml_rel_diff"] == abs(low["lml"] - full["lml"]) / abs(full["lml"])
    md = (tmp_path / "kfac_pass_memory_compare.md").read_text()
    assert "| K-FAC pass, triton, dense |" in md and "| dense | 8,589,967,360 | 8.000 |" in md
