"""The posterior table is the scripts' only source: a posterior defined here, registered, is trained with, fitted,
saved, loaded and evaluated through train.py and evaluate.py, with its own flag, without any edit to ``cli/``.

The toy posterior mixes the adapter's option probabilities with the uniform distribution, ``(1 - mix) p + mix / K``
(``--toy_mix``), and counts the training examples it was fitted on; its evaluation is checked against the adapter's
own probabilities from a plain evaluation, mixed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.synthetic import write_choice_data
from peft_bayes.errors import InputError
from peft_bayes.posterior import POSTERIORS, Posterior, posterior_class, register_posterior
from peft_bayes.posterior.base import posterior_folder


class UniformMix(Posterior):
    name: ClassVar[str] = "toy"
    stochastic: ClassVar[bool] = False
    default_samples: ClassVar[int] = 0
    accepts: ClassVar[tuple[str, ...]] = ("toy_mix", "fit_limit")
    train_time: ClassVar[bool] = True

    def __init__(self, model, mix: float = 0.0, n_data: int = 0) -> None:
        super().__init__(model)
        self.mix, self.n_data = mix, n_data

    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        parser.add_argument("--toy_mix", type=float, default=None, help="weight of the uniform distribution")

    @classmethod
    def check_args(cls, args) -> None:
        if args.toy_mix is not None and not 0 <= args.toy_mix <= 1:
            raise InputError(f"--toy_mix must be in [0, 1], got {args.toy_mix}")

    @classmethod
    def after_training(cls, work, collector) -> None:
        args = work.args
        batches = work.batches(args.data_path, args.fit_limit, "choice", 4)
        n_data = sum(len(b.labels) for b in batches)
        cls(work.model, args.toy_mix or 0.0, n_data).save(posterior_folder(args.output_dir, cls.name))

    @classmethod
    def from_args(cls, work) -> UniformMix:
        posterior = cls.load_saved(work.model, posterior_folder(work.args.adapter, cls.name))
        if work.args.toy_mix is not None:
            posterior.mix = work.args.toy_mix
        return posterior

    @classmethod
    def from_config(cls, model, config: dict) -> UniformMix:
        return cls(model, config["mix"], config["n_data"])

    def config(self) -> dict:
        return {"mix": self.mix, "n_data": self.n_data}

    def option_probs(self, scorer, samples, seed, progress=None):
        return [(1 - self.mix) * p + self.mix / len(p) for p in super().option_probs(scorer, samples, seed, progress)]


@pytest.fixture
def toy():
    register_posterior(UniformMix)
    yield UniformMix
    POSTERIORS.pop(UniformMix.name)


@pytest.fixture(scope="module")
def choice_sets(tmp_path_factory):
    train, test = write_choice_data(str(tmp_path_factory.mktemp("toy_choice")), n_train=12, n_test=6, seed=4)
    return {"train": train, "test": test}


def _eval(base, out, *extra):
    argv = ["--base_model", str(base), "--output_dir", str(out), "--quiet", "--batch_size", "3", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary,) = out.glob("*_summary.json")
    rows = json.loads(summary.with_name("test_predictions.json").read_text())
    return json.loads(summary.read_text()), torch.tensor([r["probs"] for r in rows], dtype=torch.float64)


def test_a_registered_posterior_goes_through_both_scripts(toy, llama_dir, choice_sets, tmp_path, train_argv):
    adapter = tmp_path / "adapter"
    argv = train_argv(
        llama_dir, choice_sets["train"], adapter, "--posterior", "toy", "--toy_mix", "0.25", "--fit_limit", "10"
    )
    assert train_main(argv) == 0
    saved = json.loads((adapter / "posterior" / "toy" / "posterior_config.json").read_text())
    assert saved == {"posterior": "toy", "mix": 0.25, "n_data": 10}  # fitted on the first 10 training examples

    test = ["--adapter", adapter, "--data_path", choice_sets["test"]]
    _, plain = _eval(llama_dir, tmp_path / "map", *test, "--posterior", "map")
    summary, probs = _eval(llama_dir, tmp_path / "toy", *test, "--posterior", "toy")
    assert summary["posterior"] == "toy" and summary["toy"] == {"mix": 0.25, "n_data": 10}
    torch.testing.assert_close(probs, 0.75 * plain + 0.25 / plain.shape[1], rtol=0, atol=1e-9)
    summary, probs = _eval(llama_dir, tmp_path / "toy1", *test, "--posterior", "toy", "--toy_mix", "1")
    torch.testing.assert_close(probs, torch.full_like(plain, 1 / plain.shape[1]), rtol=0, atol=1e-9)


def test_its_flags_are_checked_like_the_built_in_ones(toy, llama_dir, choice_sets, tmp_path, capsys):
    base = ["--base_model", str(llama_dir), "--data_path", choice_sets["test"], "--output_dir", str(tmp_path)]
    from peft_bayes.cli.common import run_cli

    for extra, message in [
        (["--toy_mix", "0.5"], "error: --toy_mix applies to --posterior toy only (got --posterior auto)"),
        (["--posterior", "toy", "--toy_mix", "2"], "error: --toy_mix must be in [0, 1], got 2.0"),
        (
            ["--posterior", "toy", "--fit_data_path", "x.json"],
            "error: --fit_data_path applies to --posterior laplace / temperature / tfb only (got --posterior toy)",
        ),
    ]:
        assert run_cli(evaluate_main, base + extra) == 2
        assert capsys.readouterr().err.strip() == message
    assert not any(Path(tmp_path).iterdir())  # nothing written


def test_the_table_refuses_a_taken_name_and_resolves_aliases(toy):
    class Clash(Posterior):
        name: ClassVar[str] = "other"
        aliases: ClassVar[tuple[str, ...]] = ("none",)

    with pytest.raises(ValueError, match=r"\['none'\] are taken"):
        register_posterior(Clash)
    assert posterior_class("none").name == "map" and posterior_class("toy") is toy
    with pytest.raises(InputError, match="--posterior 'nope' is unknown; known: .*toy"):
        posterior_class("nope")
