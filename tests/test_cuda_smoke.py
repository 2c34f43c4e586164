"""CUDA smoke test: the library's main paths, end to end on a tiny model, on the GPU.

Runs where CUDA is present; skipped on CPU (with the reason), except under ``PEFT_BAYES_SMOKE_ON_CPU=1``, which
``bench/gpu_check.sh --dry-run`` sets so that the same test runs on CPU (fp32 instead of bf16) before a GPU is lent.

- train.py: LoRA with ``--precision auto`` (bf16 mixed precision on a GPU that has it), two seeds with SWAG
  collection; BayesLoRA (the fused sampled kernels on CUDA); QLoRA on a 4-bit NF4 base (bitsandbytes);
- evaluate.py: every posterior fitted and evaluated (MAP, BayesLoRA samples and mean, Laplace on all layers and on
  the last layer, SWAG, MultiSWAG, MC dropout, deep ensemble, temperature, TFB) and a Laplace fit on the 4-bit base:
  finite probabilities that sum to one, a finite ECE / NLL;
- option scoring: the shared-prefix and cached paths give the full path's probabilities.

Correctness of each piece is tested against independent computations elsewhere (CPU); this file checks that those
paths run on the GPU and give sane outputs there.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.synthetic import write_choice_data
from peft_bayes.tiny import save_tiny_model

ON_CPU = os.environ.get("PEFT_BAYES_SMOKE_ON_CPU", "") == "1"
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (CUDA or ON_CPU), reason="CUDA smoke test: needs a GPU (bench/gpu_check.sh --dry-run runs it on CPU)"
)
SWAG = ["--posterior", "swag", "--swag_start", "0steps", "--swag_collect_every", "1", "--swag_export_swa"]


def _train(base, data, out, *extra):
    argv = [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), "--batch_size", "4",
        "--micro_batch_size", "4", "--num_epochs", "1", "--max_steps", "3", "--val_set_size", "0",
        "--cutoff_len", "64", "--learning_rate", "1e-2", "--warmup_steps", "0", "--save_step", "1000",
        "--logging_steps", "1", "--prompt_template", "alpaca_short", "--precision", "auto", *map(str, extra),
    ]  # fmt: skip
    assert train_main(argv) == 0
    return json.loads((Path(out) / "train_args.json").read_text())


def _eval(base, out, *extra):
    argv = ["--base_model", str(base), "--output_dir", str(out), "--quiet", "--batch_size", "4", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary,) = Path(out).glob("*_summary.json")
    rows = json.loads(summary.with_name("test_predictions.json").read_text())
    return json.loads(summary.read_text()), torch.tensor([r["probs"] for r in rows], dtype=torch.float64)


def _sane(summary, probs):
    if CUDA:  # the evaluation ran on the GPU
        assert summary["peak_cuda_bytes"], summary["peak_cuda_bytes"]
    assert probs.shape[0] > 0 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0], dtype=torch.float64), rtol=0, atol=1e-4)
    for key in ("ece_percent", "nll_nats", "brier_sum_over_classes"):
        assert math.isfinite(summary[key]), (key, summary[key])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("cuda_smoke")
    base = save_tiny_model(root / "llama", "llama", tokenizer=tiny_tokenizer, hidden_size=64, num_heads=4)
    train, test = write_choice_data(str(root / "data"), n_train=16, n_test=8, seed=5)
    runs = {}
    for seed in (0, 1):
        runs[f"lora{seed}"] = _train(base, train, root / f"lora{seed}", "--seed", seed, "--lora_dropout", "0.1", *SWAG)
    runs["bayeslora"] = _train(
        base, train, root / "bayeslora", "--adapter_name", "bayeslora", "--bayes_datasetrescaling", "false"
    )  # a KL cycle of one epoch
    runs["qlora"] = _train(base, train, root / "qlora", "--load_4bit")
    return {"root": root, "base": base, "train": train, "test": test, "runs": runs}


def test_training_runs_in_mixed_precision_where_the_gpu_has_it(setup):
    want = "bf16" if CUDA and torch.cuda.is_bf16_supported() else "fp32"
    for name, run in setup["runs"].items():
        assert run["optimizer_steps"] == 3 and math.isfinite(run["train_loss"]), name
        assert run["mixed_precision"] == want, name
    assert setup["runs"]["bayeslora"]["kl_schedule"]  # the KL term was part of the loss


@pytest.mark.parametrize(
    "name, adapter, extra",
    [
        ("map", "lora0", []),
        ("bayeslora_samples", "bayeslora", ["--samples", "4"]),
        ("bayeslora_mean", "bayeslora", ["--samples", "0"]),
        ("laplace_all", "lora0", ["--posterior", "laplace", "--fit_data_path", "TRAIN"]),
        (
            "laplace_last_layer",
            "lora0",
            ["--posterior", "laplace", "--laplace_subset", "last_layer", "--fit_data_path", "TRAIN"],
        ),
        ("swag", "lora0", ["--posterior", "swag", "--samples", "4"]),
        ("multiswag", "lora0", ["--posterior", "multiswag", "--members", "LORA1", "--samples", "4"]),
        ("mc_dropout", "lora0", ["--posterior", "mc_dropout", "--samples", "4"]),
        ("ensemble", "lora0", ["--posterior", "ensemble", "--members", "LORA1"]),
        ("temperature", "lora0", ["--posterior", "temperature", "--fit_data_path", "TRAIN"]),
        ("tfb", "lora1", ["--posterior", "tfb", "--fit_data_path", "TRAIN", "--tfb_samples", "2", "--samples", "3"]),
        ("laplace_4bit", "qlora", ["--load_4bit", "--posterior", "laplace", "--fit_data_path", "TRAIN"]),
    ],
)
def test_every_posterior_fits_and_evaluates(setup, tmp_path, name, adapter, extra):
    subst = {"TRAIN": setup["train"], "LORA1": setup["root"] / "lora1"}
    extra = [subst.get(e, e) for e in extra]
    summary, probs = _eval(
        setup["base"], tmp_path / name, "--adapter", setup["root"] / adapter, "--data_path", setup["test"], *extra
    )
    _sane(summary, probs)


def test_option_scoring_paths_agree(setup, tmp_path):
    common = ["--adapter", setup["root"] / "lora0", "--data_path", setup["test"]]
    probs = {
        s: _eval(setup["base"], tmp_path / s, *common, "--choice_scoring", s)[1] for s in ("full", "shared", "cached")
    }
    for path in ("shared", "cached"):
        torch.testing.assert_close(probs[path], probs["full"], rtol=0, atol=1e-4)
