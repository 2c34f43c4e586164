"""The Laplace workflow of the scripts: train.py --posterior laplace fits and saves the posterior next to the
adapter; evaluate.py --posterior laplace reuses it, or fits one with --fit_data_path; bad flags are one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.synthetic import make_arithmetic_problems, write_choice_data
from peft_bayes.errors import InputError


@pytest.fixture(scope="module")
def choice_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("laplace_choice")
    train, test = write_choice_data(str(root / "arith"), n_train=12, n_test=6, seed=0)
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def trained(llama_dir, choice_sets, tmp_path_factory, train_argv):
    """A LoRA adapter trained with --posterior laplace (kron, exact Fisher)."""
    out = tmp_path_factory.mktemp("laplace_adapter")
    argv = train_argv(llama_dir, choice_sets["train"], out, "--posterior", "laplace", "--laplace_fisher", "exact")
    assert train_main(argv) == 0
    return str(out)


def _eval(base, out, *extra):
    argv = ["--base_model", str(base), "--output_dir", str(out), "--quiet", "--batch_size", "3", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary,) = out.glob("*_summary.json")
    return json.loads(summary.read_text()), json.loads(summary.with_name("test_predictions.json").read_text())


def test_train_saves_a_posterior_that_evaluate_reuses(trained, llama_dir, choice_sets, tmp_path):
    folder = os.path.join(trained, "posterior", "laplace")
    config = json.load(open(os.path.join(folder, "posterior_config.json")))
    assert config["posterior"] == "laplace" and config["n_data"] == 12
    assert config["options"]["likelihood"] == "choice" and config["options"]["fisher"] == "exact"
    summary, rows = _eval(
        llama_dir, tmp_path / "a", "--adapter", trained, "--data_path", choice_sets["test"], "--posterior", "laplace"
    )
    assert summary["posterior"] == "laplace" and summary["samples"] == 0  # probit: closed form
    assert summary["laplace"]["n_fit"] == 12
    map_summary, map_rows = _eval(llama_dir, tmp_path / "b", "--adapter", trained, "--data_path", choice_sets["test"])
    assert map_summary["posterior"] == "map"
    none_summary, none_rows = _eval(
        llama_dir, tmp_path / "c", "--adapter", trained, "--data_path", choice_sets["test"], "--posterior", "none"
    )
    assert none_summary["posterior"] == "map" and [r["probs"] for r in none_rows] == [r["probs"] for r in map_rows]
    # Another predictive over the same options: each example's probabilities differ from MAP's and sum to 1.
    for lap, mp in zip(rows, map_rows):
        p, q = torch.tensor(lap["probs"], dtype=torch.float64), torch.tensor(mp["probs"], dtype=torch.float64)
        assert p.shape == q.shape and abs(float(p.sum()) - 1) < 1e-9
        assert not torch.allclose(p, q, atol=1e-6)


def test_evaluate_fits_with_fit_data_path_and_mc_link(trained, llama_dir, choice_sets, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    shutil.rmtree(adapter / "posterior")
    summary, rows = _eval(
        llama_dir,
        tmp_path / "o",
        "--adapter",
        adapter,
        "--data_path",
        choice_sets["test"],
        "--posterior",
        "laplace",
        "--fit_data_path",
        choice_sets["train"],
        "--laplace_structure",
        "diag",
        "--link",
        "mc",
        "--samples",
        "50",
    )
    assert summary["laplace"]["structure"] == "diag" and summary["samples"] == 50
    assert (adapter / "posterior" / "laplace" / "posterior.safetensors").is_file()
    assert all(abs(sum(r["probs"]) - 1) < 1e-9 for r in rows)


def test_nn_predictive_samples_weights(trained, llama_dir, choice_sets, tmp_path):
    summary, rows = _eval(
        llama_dir,
        tmp_path / "o",
        "--adapter",
        trained,
        "--data_path",
        choice_sets["test"],
        "--posterior",
        "laplace",
        "--laplace_predictive",
        "nn",
        "--samples",
        "3",
    )
    assert summary["samples"] == 3 and summary["laplace"]["predictive"] == "nn"


def test_lm_likelihood_on_generation_data(llama_dir, tmp_path, train_argv):
    data = tmp_path / "arith.json"
    data.write_text(json.dumps(make_arithmetic_problems(8, seed=2)))
    out = tmp_path / "adapter"
    assert train_main(train_argv(llama_dir, data, out, "--posterior", "laplace", "--laplace_structure", "diag")) == 0
    config = json.load(open(out / "posterior" / "laplace" / "posterior_config.json"))
    assert config["options"]["likelihood"] == "lm" and config["n_data"] == 8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--link", "mc"], "^--link applies to --posterior laplace only"),
        (["--posterior", "laplace"], "^no saved Laplace posterior in .*: give --fit_data_path"),
        (
            [
                "--posterior",
                "laplace",
                "--fit_data_path",
                "X",
                "--laplace_fisher",
                "exact",
                "--laplace_likelihood",
                "lm",
            ],
            "^--laplace_fisher exact needs --laplace_likelihood choice",
        ),
        (["--posterior", "laplace", "--prior_method", "val", "--fit_data_path", "X"], "^--prior_method val needs"),
    ],
)
def test_bad_posterior_flags(extra, message, llama_dir, choice_sets, tmp_path, train_argv):
    adapter = tmp_path / "adapter"
    assert train_main(train_argv(llama_dir, choice_sets["train"], adapter)) == 0
    extra = [str(choice_sets["train"]) if e == "X" else e for e in extra]
    argv = ["--base_model", llama_dir, "--adapter", str(adapter), "--data_path", choice_sets["test"], "--quiet",
            "--output_dir", str(tmp_path / "o"), *extra]  # fmt: skip
    with pytest.raises(InputError, match=message):
        evaluate_main(argv)
    assert not (tmp_path / "o").exists()


def test_saved_fit_flag_without_fit_data_and_changed_weights(trained, llama_dir, choice_sets, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    argv = ["--base_model", llama_dir, "--adapter", trained, "--data_path", choice_sets["test"], "--quiet",
            "--output_dir", str(tmp_path / "o"), "--posterior", "laplace"]  # fmt: skip
    with pytest.raises(InputError, match="^--laplace_structure is a fit setting: give --fit_data_path"):
        evaluate_main([*argv, "--laplace_structure", "diag"])
    changed = tmp_path / "changed"
    shutil.copytree(trained, changed)
    weights = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] + 0.01
    save_file(weights, changed / "adapter_model.safetensors")
    argv[argv.index(trained)] = str(changed)
    with pytest.raises(InputError, match="fitted on other adapter weights"):
        evaluate_main(argv)
