"""Temperature scaling (``posterior.temperature``): T = 1 changes nothing, the fitted T minimises the validation NLL
(against its neighbours and a grid, computed here in float64 from the definition), overconfident scores give T > 1,
and save → load restores the same predictions."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import POSTERIORS, PointEstimate, TemperatureScaling, load_posterior
from peft_bayes.tiny import build_tiny_model

PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
    [("2+2=", " 4"), ("2+2=", " 5"), ("2+2=", " 22")],
]
LABELS = [0, 1, 0, 2, 0]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    base = build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(base, config).eval()


def nll(scores: list[torch.Tensor], labels: list[int], t: float) -> float:
    """Mean NLL of the golds under softmax(s / t), one example at a time (the definition, float64)."""
    return sum(-float((s.double() / t).log_softmax(-1)[g]) for s, g in zip(scores, labels)) / len(scores)


def synthetic(n: int, true_t: float, scale: float, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Examples with 2-5 options: golds drawn from softmax(logits / true_t), scores = scale * logits."""
    g = torch.Generator().manual_seed(seed)
    scores, labels = [], []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        logits = 2 * torch.randn(k, generator=g, dtype=torch.float64)
        labels.append(int(torch.multinomial((logits / true_t).softmax(-1), 1, generator=g)))
        scores.append(scale * logits)
    return scores, labels


def test_registered():
    assert POSTERIORS["temperature"] is TemperatureScaling
    assert not TemperatureScaling.stochastic and TemperatureScaling.default_samples == 0


def test_temperature_one_changes_nothing(model, tiny_tokenizer):
    scorer = PairScorer(model, tiny_tokenizer, PAIRS, 2)
    scaled = TemperatureScaling(model, temperature=1.0).option_probs(scorer, 0, 0)
    plain = PointEstimate(model).option_probs(scorer, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(scaled, plain))


def test_probabilities_are_softmax_of_scaled_scores():
    scores = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, float("-inf")])]
    probs = TemperatureScaling(None, temperature=2.5).scale(scores)
    torch.testing.assert_close(probs[0], (scores[0] / 2.5).softmax(-1), rtol=0, atol=1e-15)
    assert probs[1].tolist() == [1.0, 0.0]


def test_fitted_temperature_minimises_validation_nll():
    scores, labels = synthetic(300, true_t=2.0, scale=1.0, seed=1)
    posterior = TemperatureScaling(None)
    t = posterior.fit_scores(scores, labels)
    best = nll(scores, labels, t)
    for factor in (1 - 1e-3, 1 + 1e-3):  # a local minimum
        assert best <= nll(scores, labels, t * factor)
    grid = [10 ** (k / 40) for k in range(-80, 81)]  # 0.01 ... 100, a coarse grid: no better value anywhere
    assert best <= min(nll(scores, labels, g) for g in grid)
    assert posterior.nll_after == pytest.approx(best, rel=1e-12)
    assert posterior.nll_before == pytest.approx(nll(scores, labels, 1.0), rel=1e-12)
    assert posterior.nll_after < posterior.nll_before


@pytest.mark.parametrize(("scale", "above_one"), [(4.0, True), (0.25, False)])
def test_overconfident_scores_give_t_above_one(scale, above_one):
    scores, labels = synthetic(2000, true_t=1.0, scale=scale, seed=2)  # golds from the unscaled logits
    t = TemperatureScaling(None).fit_scores(scores, labels)
    assert (t > 1) == above_one
    assert t == pytest.approx(scale, rel=0.2)  # the calibrating temperature is about the scale


def test_fit_through_an_option_scorer_uses_its_scores(model, tiny_tokenizer):
    scorer = PairScorer(model, tiny_tokenizer, PAIRS, 2, labels=LABELS)
    posterior = TemperatureScaling(model)
    posterior.fit(scorer)
    direct = TemperatureScaling(None)
    direct.fit([(s, g) for s, g in zip(scorer.scores(), LABELS)])
    assert posterior.temperature == direct.temperature
    assert posterior.n_data == len(PAIRS)


def test_save_load_gives_identical_predictions(model, tiny_tokenizer, tmp_path):
    scorer = PairScorer(model, tiny_tokenizer, PAIRS, 2, labels=LABELS)
    posterior = TemperatureScaling(model)
    posterior.fit(scorer)
    assert posterior.temperature != 1.0
    folder = posterior.save(str(tmp_path / "temperature"))
    loaded = load_posterior(model, folder)
    assert isinstance(loaded, TemperatureScaling)
    assert loaded.temperature == posterior.temperature
    assert (loaded.nll_before, loaded.nll_after) == (posterior.nll_before, posterior.nll_after)
    before, after = posterior.option_probs(scorer, 0, 0), loaded.option_probs(scorer, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_load_refuses_other_adapter_weights(model, tiny_tokenizer, tmp_path):
    posterior = TemperatureScaling(model)
    posterior.fit(PairScorer(model, tiny_tokenizer, PAIRS, 2, labels=LABELS))
    # the fingerprint written out: sha256 over PEFT's adapter state dict, sorted keys, each key then float32 bytes
    state = get_peft_model_state_dict(model)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].detach().float().numpy().tobytes())
    assert posterior.fingerprint == digest.hexdigest()
    folder = posterior.save(str(tmp_path / "temperature"))
    weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        weight.add_(1.0)
    try:
        with pytest.raises(InputError, match="fingerprint"):
            load_posterior(model, folder)
    finally:
        with torch.no_grad():
            weight.sub_(1.0)


def test_errors(model, tiny_tokenizer):
    with pytest.raises(InputError, match="not fitted"):
        TemperatureScaling(model).option_probs(PairScorer(model, tiny_tokenizer, PAIRS, 2), 0, 0)
    with pytest.raises(InputError, match="gold answers"):
        TemperatureScaling(model).fit(PairScorer(model, tiny_tokenizer, PAIRS, 2))
    with pytest.raises(InputError, match="validation example 1"):
        TemperatureScaling(None).fit_scores([torch.zeros(2), torch.zeros(3)], [0, 3])
    with pytest.raises(InputError, match="positive"):
        TemperatureScaling(None, temperature=-1.0)
    with pytest.raises(InputError, match="--samples 0"):
        TemperatureScaling(None, temperature=1.0).resolve_samples(5)
    assert TemperatureScaling(None, temperature=1.0).resolve_samples(None) == 0
    assert math.isfinite(TemperatureScaling(None).fit_scores([torch.tensor([5.0, 0.0])], [0]))  # separable: bounded
