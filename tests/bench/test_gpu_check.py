"""bench/gpu_check.sh and bench/gpu_targets.py, before a GPU is lent.

- the dry run (``--dry-run``: every step on CPU at tiny shapes, Triton's interpreter) passes every step and returns
  the packed results: the environment, the three benchmarks' JSON, the logs, the targets table marked as no
  measurement;
- bad arguments are one-line errors (exit 2);
- the targets' verdicts against hand-made results: the limits are inclusive, CPU results are never "met", a missing
  file is "no result".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_targets  # noqa: E402

STEPS = ["install", "env", "kernels", "sampled_lora", "smoke", "kfac", "step", "targets"]  # the default run


def _run(*args, timeout=60):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_dry_run_passes_every_step_and_returns_its_results(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check: dry run")
    for step in STEPS:
        assert f"| {step} | passed |" in summary, step
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}
        env = json.load(tar.extractfile("./results/env.json"))
    for name in ["steps.tsv", "targets.md", *(f"{s}.log" for s in STEPS)]:
        assert name in names, name
    for name in ("env.json", "sampled_lora.json", "bayeslora_step.json", "kfac_pass.json"):
        assert f"results/{name}" in names, name
    assert env["triton_runtime"] == "interpreter" and env["gpu"] is None
    assert not any(n.startswith("site") for n in names)  # installed wheels are not results
    assert "(CPU: not a measurement)" in summary and "| met |" not in summary
    assert "K-FAC pass (fused statistics, dense factors) vs gradient pass, tiny LLaMA 64x2x4" in summary


def test_dry_run_of_the_tune_step_alone(tmp_path):
    # Not in the default run (a call of its own on the device): --only tune runs it and nothing else.
    proc = _run("--dry-run", "--only", "tune", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| tune | passed |" in summary and "| kernels |" not in summary
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        data = json.load(tar.extractfile("./results/tune/sampled_lora.json"))
    assert data["settings"]["tiles"] == ["16x16w2", "32x32"] and len(data["best_tiles"]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "kernels,nope"], "gpu_check.sh: unknown step 'nope' in --only"),
        (["--frobnicate"], "gpu_check.sh: unknown argument '--frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    proc = _run(*args, "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message)


def _sampled_rows(ratio_fp, ratio_nf4, extra_mib):
    rows = []
    for base, ratio in (("fp", ratio_fp), ("nf4", ratio_nf4)):
        for tokens in (512, 4096):
            common = {"base": base, "shape": "4096x4096", "d_in": 4096, "d_out": 4096, "tokens": tokens, "rank": 16,
                      "dtype": "bfloat16"}  # fmt: skip
            rows.append(
                {
                    **common,
                    "config": "fused_bayeslora",
                    "kernel": "triton",
                    "fwdbwd_vs_peft_lora": ratio if tokens == 4096 else 9.0,
                    "extra_peak_vs_peft_lora_mib": extra_mib,
                }
            )
    return rows


def test_targets_verdicts(tmp_path):
    (tmp_path / "sampled_lora.json").write_text(json.dumps({"cuda": "13.0", "rows": _sampled_rows(1.05, 1.2, 15.9)}))
    md = gpu_targets.markdown(tmp_path)
    assert "| fused BayesLoRA fwd+bwd vs PEFT LoRA, rank 16 | <= 1.05x | 1.050x | met |" in md  # inclusive
    assert "(NF4), rank 16 | <= 1.10x | 1.200x | missed |" in md
    assert "fp, rank 16 | < 16 MiB (half a tokens x d_in tensor) | 15.9 MiB | met |" in md  # 4096 x 4096 x 2 B / 2
    assert "| K-FAC pass (fused statistics, dense factors) vs gradient pass | <= 1.30x | - | no result |" in md
    assert "9.000x" not in md  # the 512-token rows are not the target case
    kfac = {"args": {"device": "cuda"}, "info": {"model": "m"}, "pass": {"K-FAC pass, triton, dense": {"ratio": 1.31}}}
    (tmp_path / "kfac.json").write_text(json.dumps(kfac))
    assert "vs gradient pass, m | <= 1.30x | 1.310x | missed |" in gpu_targets.markdown(tmp_path)


def test_targets_on_cpu_results_are_never_met(tmp_path):
    rows = [{**r, "shape": "48x40", "d_in": 48, "tokens": 16} for r in _sampled_rows(1.0, 1.0, None)]
    (tmp_path / "sampled_lora.json").write_text(json.dumps({"cuda": None, "rows": rows}))
    md = gpu_targets.markdown(tmp_path)
    assert "rank 16 (stand-in: 48x40, 16 tokens) | <= 1.05x | 1.000x | met (CPU: not a measurement) |" in md
    assert "no result (peak memory is measured on CUDA only)" in md
    assert gpu_targets.main([str(tmp_path / "missing")]) == 2
