"""evaluate.py with the posteriors beside Laplace: temperature scaling (fitted on a validation set, saved next to
the adapter, reused), MC dropout (the adapter's own rate or --mc_dropout_rate) and deep ensembles (--adapter and
--members as named adapters of one model); each checked against an independent computation from the written
probabilities or from single-adapter runs, and their flag errors."""

from __future__ import annotations

import json

import pytest
import torch

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.synthetic import write_choice_data
from peft_bayes.errors import InputError


@pytest.fixture(scope="module")
def choice_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("posterior_choice")
    train, test = write_choice_data(str(root / "arith"), n_train=12, n_test=6, seed=3)
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def adapters(llama_dir, choice_sets, tmp_path_factory, train_argv):
    """Two LoRA adapters (seeds 0 and 1, lora_dropout 0.1) on the same base model."""
    out = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"member{seed}")
        argv = train_argv(llama_dir, choice_sets["train"], folder, "--seed", seed, "--lora_dropout", "0.1")
        assert train_main(argv) == 0
        out.append(str(folder))
    return out


def _eval(base, out, *extra):
    argv = ["--base_model", str(base), "--output_dir", str(out), "--quiet", "--batch_size", "3", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary,) = out.glob("*_summary.json")
    rows = json.loads(summary.with_name("test_predictions.json").read_text())
    return json.loads(summary.read_text()), torch.tensor([r["probs"] for r in rows], dtype=torch.float64)


def test_ensemble_averages_the_members_probabilities(adapters, llama_dir, choice_sets, tmp_path):
    test = ["--data_path", choice_sets["test"]]
    singles = [_eval(llama_dir, tmp_path / f"m{i}", "--adapter", a, *test)[1] for i, a in enumerate(adapters)]
    assert not torch.allclose(singles[0], singles[1], atol=1e-4)  # the members differ
    summary, probs = _eval(llama_dir, tmp_path / "ens", "--adapter", adapters[0], "--members", adapters[1],
                           "--posterior", "ensemble", *test)  # fmt: skip
    assert summary["posterior"] == "ensemble" and summary["samples"] == 2
    torch.testing.assert_close(probs, (singles[0] + singles[1]) / 2, rtol=0, atol=1e-6)


def test_temperature_fits_saves_and_is_reused(adapters, llama_dir, choice_sets, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters[0], adapter)
    test = ["--adapter", adapter, "--data_path", choice_sets["test"]]
    _, plain = _eval(llama_dir, tmp_path / "map", *test)
    summary, probs = _eval(llama_dir, tmp_path / "t", *test, "--posterior", "temperature", "--fit_data_path",
                           choice_sets["train"])  # fmt: skip
    T = summary["temperature"]["temperature"]
    assert summary["samples"] == 0 and summary["temperature"]["n_data"] == 12 and T != pytest.approx(1.0)
    # independent: softmax(log p / T) of the plain adapter's probabilities
    torch.testing.assert_close(probs, torch.softmax(plain.log() / T, -1), rtol=0, atol=1e-6)
    assert (adapter / "posterior" / "temperature" / "posterior.safetensors").is_file()
    again, reused = _eval(llama_dir, tmp_path / "t2", *test, "--posterior", "temperature")
    assert again["temperature"]["temperature"] == T
    torch.testing.assert_close(reused, probs, rtol=0, atol=0)


def test_mc_dropout_uses_the_adapters_rate_and_rate_zero_is_the_adapter(adapters, llama_dir, choice_sets, tmp_path):
    test = ["--adapter", adapters[0], "--data_path", choice_sets["test"]]
    _, plain = _eval(llama_dir, tmp_path / "map", *test)
    summary, probs = _eval(llama_dir, tmp_path / "mc", *test, "--posterior", "mc_dropout", "--samples", "4")
    assert summary["samples"] == 4 and summary["mc_dropout"]["rates"] == [pytest.approx(0.1)]
    assert not torch.allclose(probs, plain, atol=1e-6)
    _, again = _eval(llama_dir, tmp_path / "mc2", *test, "--posterior", "mc_dropout", "--samples", "4")
    torch.testing.assert_close(again, probs, rtol=0, atol=0)  # masks seeded by --seed
    _, zero = _eval(llama_dir, tmp_path / "mc0", *test, "--posterior", "mc_dropout", "--samples", "2",
                    "--mc_dropout_rate", "0")  # fmt: skip
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--members", "X"], "^--members applies to --posterior ensemble only"),
        (["--posterior", "ensemble"], "^--posterior ensemble needs at least two member adapters"),
        (["--mc_dropout_rate", "0.1"], "^--mc_dropout_rate applies to --posterior mc_dropout only"),
        (["--posterior", "mc_dropout", "--mc_dropout_rate", "1.5"], r"^--mc_dropout_rate must be in \[0, 1\)"),
        (["--fit_data_path", "X"], "^--fit_data_path applies to --posterior laplace / temperature only"),
        (["--posterior", "temperature"], "^no saved temperature in .*: give --fit_data_path"),
        (["--posterior", "temperature", "--samples", "3"], "^--samples 3 needs"),
    ],
)
def test_bad_flags(extra, message, adapters, llama_dir, choice_sets, tmp_path):
    extra = [adapters[1] if e == "X" else e for e in extra]
    argv = ["--base_model", llama_dir, "--adapter", adapters[0], "--data_path", choice_sets["test"], "--quiet",
            "--output_dir", str(tmp_path / "o"), *extra]  # fmt: skip
    with pytest.raises(InputError, match=message):
        evaluate_main(argv)
    assert not (tmp_path / "o").exists()
