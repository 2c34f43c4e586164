"""Deep ensembles (``posterior.ensemble``): members loaded as named adapters of one PeftModel; an ensemble of identical
adapters equals the adapter, two members average their probabilities exactly (each member scored alone, in its own
model), a pass per member; save → load; one-line errors for members that do not belong together."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import POSTERIORS, Ensemble, PointEstimate, load_posterior
from peft_bayes.tiny import build_tiny_model
from peft_bayes.tuners import BottleneckConfig

PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
]
EXACT = {"rtol": 1e-15, "atol": 1e-16}  # float64 sums of two or three probabilities: a few ulp


@pytest.fixture(scope="module")
def base(tiny_tokenizer):
    return build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2).eval()


def save_adapter(base, folder: str, config, seed: int) -> str:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a visibly different function per seed
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(4.0)
    model.save_pretrained(folder)
    return folder


def lora_config():
    return LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    return [save_adapter(base, str(root / f"seed{s}"), lora_config(), s) for s in (1, 2)]


def alone(base, folder: str, tokenizer) -> list[torch.Tensor]:
    """A member's option probabilities in its own PeftModel over its own copy of the base."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    return PointEstimate(model).option_probs(PairScorer(model, tokenizer, PAIRS, 2), 0, 0)


def ensemble_probs(ensemble: Ensemble, tokenizer, samples=None) -> list[torch.Tensor]:
    scorer = PairScorer(ensemble.model, tokenizer, PAIRS, 2)
    return ensemble.option_probs(scorer, ensemble.resolve_samples(samples), 0)


def test_registered():
    assert POSTERIORS["ensemble"] is Ensemble and Ensemble.stochastic


def test_identical_members_equal_one_adapter(base, folders, tiny_tokenizer):
    ensemble = Ensemble.from_folders(copy.deepcopy(base), [folders[0]] * 3)
    assert ensemble.members == ["member0", "member1", "member2"] and ensemble.resolve_samples(None) == 3
    for a, b in zip(ensemble_probs(ensemble, tiny_tokenizer), alone(base, folders[0], tiny_tokenizer)):
        torch.testing.assert_close(a, b, **EXACT)


def test_two_members_average_probabilities(base, folders, tiny_tokenizer):
    ensemble = Ensemble.from_folders(copy.deepcopy(base), folders)
    p1, p2 = (alone(base, f, tiny_tokenizer) for f in folders)
    mixed = ensemble_probs(ensemble, tiny_tokenizer)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(p1, p2))  # the members differ
    for m, a, b in zip(mixed, p1, p2):
        torch.testing.assert_close(m, (a + b) / 2, **EXACT)
        torch.testing.assert_close(m.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    # probabilities, not logits: the softmax of the averaged log-probabilities is another distribution
    logit_mean = [((a.log() + b.log()) / 2).softmax(-1) for a, b in zip(p1, p2)]
    assert not all(torch.allclose(m, lm, atol=1e-4) for m, lm in zip(mixed, logit_mean))
    # --samples 1: the first member only; 0 (no mean weights): every member
    for m, a in zip(ensemble_probs(ensemble, tiny_tokenizer, 1), p1):
        torch.testing.assert_close(m, a, **EXACT)
    for m, a in zip(ensemble.option_probs(PairScorer(ensemble.model, tiny_tokenizer, PAIRS, 2), 0, 0), mixed):
        torch.testing.assert_close(m, a, **EXACT)


def test_passes_one_member_each_and_restore_the_model(base, folders, tiny_tokenizer):
    ensemble = Ensemble.from_folders(copy.deepcopy(base), folders)
    model = ensemble.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    for context, _ in ensemble.passes(2, seed=0):
        with context:
            seen.append(model.active_adapter)
    assert seen == ["member0", "member1"]
    assert model.active_adapter == "member0"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="has 2 members"):
        ensemble.resolve_samples(3)
    with pytest.raises(InputError, match="no mean weights"):
        ensemble.mean()


def test_members_join_a_peft_model(base, folders, tiny_tokenizer):
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="member0")
    ensemble = Ensemble.from_folders(model, folders)
    assert ensemble.model is model and ensemble.members == ["member0_1", "member1"]
    p1, p2 = (alone(base, f, tiny_tokenizer) for f in folders)
    for m, a, b in zip(ensemble_probs(ensemble, tiny_tokenizer), p1, p2):
        torch.testing.assert_close(m, (a + b) / 2, **EXACT)


def test_save_load_records_the_folders(base, folders, tiny_tokenizer, tmp_path):
    ensemble = Ensemble.from_folders(copy.deepcopy(base), folders)
    folder = ensemble.save(str(tmp_path / "posterior" / "ensemble"))
    with open(os.path.join(folder, "posterior_config.json")) as f:
        config = json.load(f)
    assert config["members"] == [os.path.abspath(f) for f in folders] and config["peft_type"] == "LORA"
    assert os.path.getsize(os.path.join(folder, "posterior.safetensors")) < 1024  # no weights copied
    loaded = load_posterior(copy.deepcopy(base), folder)
    assert isinstance(loaded, Ensemble) and loaded.folders == ensemble.folders
    for a, b in zip(ensemble_probs(loaded, tiny_tokenizer), ensemble_probs(ensemble, tiny_tokenizer)):
        assert torch.equal(a, b)


def test_errors(base, folders, tmp_path):
    other_base = str(tmp_path / "other_base")
    shutil.copytree(folders[1], other_base)
    path = os.path.join(other_base, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = "some/other-model"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(InputError, match="different base models"):
        Ensemble.from_folders(copy.deepcopy(base), [folders[0], other_base])

    bottleneck = save_adapter(base, str(tmp_path / "bottleneck"), BottleneckConfig(target_modules=["c_attn"]), 0)
    with pytest.raises(InputError, match="different adapter types"):
        Ensemble.from_folders(copy.deepcopy(base), [folders[0], bottleneck])

    with pytest.raises(InputError, match="not an adapter folder"):
        Ensemble.from_folders(copy.deepcopy(base), [folders[0], str(tmp_path)])
    with pytest.raises(InputError, match="at least one member"):
        Ensemble.from_folders(copy.deepcopy(base), [])
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0])
    with pytest.raises(InputError, match="not adapters of this model"):
        Ensemble(model, ["default", "nope"])
    with pytest.raises(InputError, match="only one loaded from folders"):
        Ensemble(model, ["default"]).save(str(tmp_path / "in_memory"))
