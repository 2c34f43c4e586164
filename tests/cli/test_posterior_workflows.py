"""The scripts with the posteriors beside Laplace: temperature scaling (fitted on a validation set, saved next to
the adapter, reused), MC dropout (the adapter's own rate or --mc_dropout_rate), deep ensembles (--adapter and
--members as named adapters of one model), SWAG collected by train.py and MultiSWAG over two SWAG adapters, and
TFB turning a LoRA into a BayesLoRA; each checked against an independent computation (the written probabilities,
single-adapter runs, the exported SWA mean loaded by plain PEFT), and their flag errors."""

from __future__ import annotations

import json
from pathlib import Path

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


SWAG = ["--posterior", "swag", "--swag_start", "0steps", "--swag_collect_every", "1", "--swag_export_swa"]


@pytest.fixture(scope="module")
def adapters(llama_dir, choice_sets, tmp_path_factory, train_argv):
    """Two LoRA adapters (seeds 0 and 1, lora_dropout 0.1) on the same base model, trained with SWAG collection
    after each of their 3 optimizer steps (and the SWA mean exported to <adapter>/swa)."""
    out = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"member{seed}")
        argv = train_argv(
            llama_dir,
            choice_sets["train"],
            folder,
            "--seed",
            seed,
            "--lora_dropout",
            "0.1",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            *SWAG,
        )
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
    summary, probs = _eval(
        llama_dir,
        tmp_path / "ens",
        "--adapter",
        adapters[0],
        "--members",
        adapters[1],
        "--posterior",
        "ensemble",
        *test,
    )
    assert summary["posterior"] == "ensemble" and summary["samples"] == 2
    torch.testing.assert_close(probs, (singles[0] + singles[1]) / 2, rtol=0, atol=1e-6)


def test_temperature_fits_saves_and_is_reused(adapters, llama_dir, choice_sets, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters[0], adapter)
    test = ["--adapter", adapter, "--data_path", choice_sets["test"]]
    _, plain = _eval(llama_dir, tmp_path / "map", *test)
    summary, probs = _eval(
        llama_dir, tmp_path / "t", *test, "--posterior", "temperature", "--fit_data_path", choice_sets["train"]
    )
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
    _, zero = _eval(
        llama_dir, tmp_path / "mc0", *test, "--posterior", "mc_dropout", "--samples", "2", "--mc_dropout_rate", "0"
    )
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)


def test_swag_collected_by_train_and_its_mean_is_the_exported_swa_adapter(adapters, llama_dir, choice_sets, tmp_path):
    config = json.loads((Path(adapters[0]) / "posterior" / "swag" / "posterior_config.json").read_text())
    assert config["n_models"] == 3 and config["collected_steps"] == [1, 2, 3]
    test = ["--data_path", choice_sets["test"]]
    _, swa = _eval(llama_dir, tmp_path / "swa", "--adapter", Path(adapters[0]) / "swa", *test)  # plain PEFT
    _, final = _eval(llama_dir, tmp_path / "final", "--adapter", adapters[0], *test)
    assert not torch.allclose(swa, final, atol=1e-5)  # the mean of 3 iterates is not the last one
    summary, mean = _eval(
        llama_dir,
        tmp_path / "s0",
        "--adapter",
        adapters[0],
        *test,
        "--posterior",
        "swag",
        "--swag_sample_scale",
        "0",
        "--samples",
        "2",
    )
    assert summary["posterior"] == "swag" and summary["samples"] == 2
    torch.testing.assert_close(mean, swa, rtol=0, atol=1e-6)
    summary, sampled = _eval(llama_dir, tmp_path / "s", "--adapter", adapters[0], *test, "--posterior", "swag")
    assert summary["samples"] == 10 and not torch.allclose(sampled, swa, atol=1e-6)


def test_multiswag_mean_passes_average_the_members_swa_adapters(adapters, llama_dir, choice_sets, tmp_path):
    test = ["--data_path", choice_sets["test"]]
    swas = [
        _eval(llama_dir, tmp_path / f"swa{i}", "--adapter", Path(a) / "swa", *test)[1] for i, a in enumerate(adapters)
    ]
    multiswag = ["--adapter", adapters[0], "--members", adapters[1], "--posterior", "multiswag"]
    summary, probs = _eval(llama_dir, tmp_path / "ms", *multiswag, "--samples", "0", *test)
    assert summary["posterior"] == "multiswag"
    torch.testing.assert_close(probs, (swas[0] + swas[1]) / 2, rtol=0, atol=1e-6)
    summary, _ = _eval(llama_dir, tmp_path / "ms4", *multiswag, "--samples", "4", *test)
    assert summary["samples"] == 4


def test_tfb_makes_a_bayeslora_whose_mean_is_the_lora(adapters, llama_dir, choice_sets, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters[1], adapter)
    test = ["--adapter", adapter, "--data_path", choice_sets["test"]]
    _, lora = _eval(llama_dir, tmp_path / "map", *test)
    summary, mean = _eval(
        llama_dir,
        tmp_path / "t0",
        *test,
        "--posterior",
        "tfb",
        "--fit_data_path",
        choice_sets["train"],
        "--tfb_samples",
        "2",
        "--samples",
        "0",
    )
    assert summary["posterior"] == "bayeslora" and summary["samples"] == 0
    torch.testing.assert_close(mean, lora, rtol=0, atol=1e-6)  # B'A' = BA
    tfb = json.loads((adapter / "posterior" / "tfb" / "tfb_config.json").read_text())
    assert tfb["sigma"] > 0 and tfb["nll_at_sigma"] <= tfb["threshold"]
    assert json.loads((adapter / "posterior" / "tfb" / "adapter_config.json").read_text())["peft_type"] == "BAYESLORA"
    summary, sampled = _eval(llama_dir, tmp_path / "t1", *test, "--posterior", "tfb", "--samples", "3")  # reused
    _, again = _eval(llama_dir, tmp_path / "t2", *test, "--posterior", "tfb", "--samples", "3")
    assert summary["samples"] == 3
    torch.testing.assert_close(again, sampled, rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--members", "X"], "^--members applies to --posterior ensemble / multiswag only"),
        (["--posterior", "ensemble"], "^--posterior ensemble needs at least two member adapters"),
        (["--mc_dropout_rate", "0.1"], "^--mc_dropout_rate applies to --posterior mc_dropout only"),
        (["--posterior", "mc_dropout", "--mc_dropout_rate", "1.5"], r"^--mc_dropout_rate must be in \[0, 1\)"),
        (["--fit_data_path", "X"], "^--fit_data_path applies to --posterior laplace / temperature / tfb only"),
        (["--posterior", "temperature"], "^no saved temperature in .*: give --fit_data_path"),
        (["--posterior", "temperature", "--samples", "3"], "^--samples 3 needs"),
        (["--swag_sample_scale", "0.5"], "^--swag_sample_scale applies to --posterior swag / multiswag only"),
        (["--posterior", "swag", "--swag_sample_scale", "-1"], "^--swag_sample_scale must be a non-negative"),
        (["--tfb_epsilon", "0.1"], "^--tfb_epsilon applies to --posterior tfb only"),
        (["--posterior", "tfb"], "^no saved TFB adapter in .*: give --fit_data_path"),
        (["--posterior", "multiswag", "--members", "X", "--samples", "3"], "^--samples 3 must be a multiple"),
    ],
)
def test_bad_flags(extra, message, adapters, llama_dir, choice_sets, tmp_path):
    extra = [adapters[1] if e == "X" else e for e in extra]
    argv = ["--base_model", llama_dir, "--adapter", adapters[0], "--data_path", choice_sets["test"], "--quiet",
            "--output_dir", str(tmp_path / "o"), *extra]  # fmt: skip
    with pytest.raises(InputError, match=message):
        evaluate_main(argv)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--swag_start", "1"], "^--swag_start applies to --posterior swag only"),
        (["--posterior", "swag", "--swag_start", "soon"], "^--swag_start must be an epoch"),
        (["--posterior", "swag", "--swag_anneal_epochs", "-1"], "^--swag_anneal_epochs must be"),
        (["--posterior", "swag", "--resume_from_checkpoint", "."], "^--posterior swag cannot resume"),
        (["--posterior", "swag", "--swag_start", "5steps"], "^--swag_start is at step 5, at or after the end"),
    ],
)
def test_bad_swag_training_flags(extra, message, llama_dir, choice_sets, tmp_path, train_argv):
    with pytest.raises(InputError, match=message):
        train_main(train_argv(llama_dir, choice_sets["train"], tmp_path / "o", *extra))
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()
