"""TFB's search (``posterior.tfb_search``) and criteria: the interpolation search brackets the same root as bisection
on known curves in fewer evaluations, the halving search is BLoB's rule step by step, the expected and predictive
anchor NLLs and pseudo-labels equal computations by hand through ``BayesLoraPosterior``'s samples, and the fast-path
scorer gives the differentiable batches' NLLs."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import BayesLoraPosterior, sample_seed
from peft_bayes.posterior.likelihood import choice_scores
from peft_bayes.posterior.tfb import TfbOptions, bayesianize, convert, set_sigma
from peft_bayes.posterior.tfb_search import (
    Anchors,
    anchor_nll,
    bisection_steps,
    halving_search,
    interpolation_search,
    search_sigma,
)
from peft_bayes.tiny import build_tiny_model

PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
]
LABELS = [0, 0, 1, 2]


def lora_model(tokenizer, seed: int = 0):
    base = build_tiny_model("gpt2", tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(base, config).double().eval()


def scorer(model, tokenizer):
    return PairScorer(model, tokenizer, PAIRS, 2, labels=LABELS)


# --- the searches on known curves ------------------------------------------------------------------------------------
CURVES = {
    "sigma^2": lambda s: 1.0 + 3.0 * s**2,
    # the real model's shape (bench/results/tfb_search.json): linear at small sigma, saturating at sigma 1
    "real": lambda s: 1.0 + 7.15 * math.tanh((6.2 * s + 300 * s * s) / 7.15) / 0.09,
    "sigma^1": lambda s: 1.0 + 0.5 * s,
    "sigma^3": lambda s: 1.0 + 40.0 * s**3,
    "exp": lambda s: math.exp(s),
    "plateau": lambda s: 1.0 if s < 0.05 else 1.0 + 20.0 * (s - 0.05) ** 2,
    "nan above": lambda s: math.nan if s > 0.3 else 1.0 + s**2,
}


@pytest.mark.parametrize("name", list(CURVES))
def test_interpolation_brackets_the_bisection_root(name):
    curve, threshold, bounds, tol = CURVES[name], 1.06, (1e-6, 1.0), 0.02
    seen = []

    def f(s):
        seen.append(s)
        return curve(s)

    lo, v_lo, hi, v_hi, n = interpolation_search(f, threshold, bounds, tol, base=curve(0.0))
    assert n == len(seen) and v_lo == curve(lo) <= threshold and not curve(hi) <= threshold
    assert hi / lo <= 1 + tol + 1e-12
    bisected = search_sigma(curve, threshold, bounds, tol)[0]
    assert abs(math.log(lo / bisected)) <= math.log1p(tol)
    assert n <= 2 * (2 + bisection_steps(bounds, tol))
    if name in ("sigma^2", "sigma^1", "sigma^3", "exp", "real"):  # power-law-like curves: far fewer than bisection
        assert n <= 5 < 2 + bisection_steps(bounds, tol)
    assert n < 2 + bisection_steps(bounds, tol)


def test_interpolation_keeps_the_bisection_contract():
    assert interpolation_search(lambda s: s, 2.0, (0.1, 1.2), 0.01, base=0.0)[:3] == (1.2, 1.2, None)
    with pytest.raises(InputError, match="sigma_bounds: even sigma=2 gives anchor NLL 4"):
        interpolation_search(lambda s: s * s, 2.0, (2.0, 100.0), 0.01, base=0.0)


def test_halving_is_blobs_rule():
    """[0.001, 0.2], five halvings, violation above 0.05: the midpoints and the answer by hand."""
    seen = []

    def f(s):
        seen.append(s)
        return s

    sigma, value, upper, _, n = halving_search(lambda v: v > 0.05, f, (0.001, 0.2), 5)
    lo, hi, best, expected = 0.001, 0.2, 0.2, []
    for _ in range(5):
        mid = (lo + hi) / 2
        expected.append(mid)
        if mid > 0.05:
            best, hi = mid, mid
        else:
            lo = mid
    assert seen == expected and sigma == best == upper == value and n == 5
    sigma, value, upper, _, _ = halving_search(lambda v: False, f, (0.001, 0.2), 3)  # nothing violates
    assert sigma == 0.2 and math.isnan(value) and upper is None


# --- the criteria against computations by hand ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bayes(tiny_tokenizer):
    """A TFB BayesLoRA model at sigma 0.05 and the anchor batches of its LoRA."""
    model = lora_model(tiny_tokenizer)
    batches = list(scorer(model, tiny_tokenizer).batches())
    converted, scales = convert(model)
    set_sigma(converted, scales, 0.05, "square")
    return converted, batches


def label_probs(model, batches, labels) -> torch.Tensor:
    """(examples,) probability of each example's label (batches may have different numbers of options)."""
    probs = {i: p for b in batches for i, p in zip(b.index.tolist(), choice_scores(model, b).softmax(-1))}
    return torch.stack([probs[i][y] for i, y in enumerate(labels)])


def by_hand(model, batches, labels, samples: int, seed: int) -> tuple[float, float]:
    """(expected, predictive) NLL per example through BayesLoraPosterior's weight samples."""
    posterior, probs = BayesLoraPosterior(model, draw="pass"), []
    for k in range(samples):
        with posterior.sample(sample_seed(seed, k)), torch.no_grad():
            probs.append(label_probs(model, batches, labels))
    p = torch.stack(probs)  # (samples, examples)
    return float(-p.log().mean()), float(-p.mean(0).log().mean())


@pytest.mark.parametrize("predictive", [False, True], ids=["expected", "predictive"])
def test_anchor_nll_by_hand(bayes, predictive):
    model, batches = bayes
    expected, pred = by_hand(model, batches, LABELS, 3, 7)
    got = anchor_nll(model, Anchors(batches), None, 3, 7, predictive)
    assert got == pytest.approx(pred if predictive else expected, rel=1e-10)
    assert pred < expected  # Jensen: the mixture's NLL is below the mean NLL


def test_scorer_anchors_equal_the_batches(bayes, tiny_tokenizer):
    """The fast path (one packed row per example) gives the differentiable batches' log-likelihoods."""
    model, batches = bayes
    fast = Anchors(scorer(model, tiny_tokenizer))
    torch.testing.assert_close(fast.logps(model), Anchors(batches).logps(model), rtol=1e-10, atol=1e-12)
    assert fast.count == Anchors(batches).count == len(LABELS)


def test_pseudo_labels_are_the_mean_models_answers(bayes, tiny_tokenizer):
    model, batches = bayes
    with torch.no_grad():
        scores = {i: s for b in batches for i, s in zip(b.index.tolist(), choice_scores(model, b))}
        mine = torch.tensor([int(scores[i].argmax()) for i in range(len(scores))])
    assert torch.equal(Anchors(batches).predictions(model), mine)
    assert mine.tolist() != LABELS  # the test means something: gold and pseudo-labels differ here
    expected, _ = by_hand(model, batches, mine.tolist(), 2, 0)
    assert anchor_nll(model, Anchors(batches), mine, 2, 0, False) == pytest.approx(expected, rel=1e-10)


def test_blob_criterion_end_to_end(tiny_tokenizer):
    """BLoB's settings through bayesianize: the sigma of its rule, re-run by hand with BayesLoraPosterior."""
    options = TfbOptions(
        nll="predictive",
        labels="pseudo",
        search="halving",
        halvings=5,
        per_anchor=True,
        epsilon=0.003,
        sigma_bounds=(0.001, 0.2),
        samples=1,
        seed=2,
    )
    model = lora_model(tiny_tokenizer)
    batches = list(scorer(model, tiny_tokenizer).batches())
    with torch.no_grad():
        scores = {i: s for b in batches for i, s in zip(b.index.tolist(), choice_scores(model, b))}
        pseudo = [int(scores[i].argmax()) for i in range(len(scores))]
        mean_nll = float(-label_probs(model, batches, pseudo).log().mean())
    twin = lora_model(tiny_tokenizer)  # the same LoRA, converted here to replay the search
    bayes_twin, scales = convert(twin)
    bayes_model, result = bayesianize(model, batches, options)
    assert result.nll_mean == pytest.approx(mean_nll, rel=1e-12)
    lo, hi, best = 0.001, 0.2, 0.2
    for _ in range(5):
        mid = (lo + hi) / 2
        set_sigma(bayes_twin, scales, mid, "square")
        _, nll = by_hand(bayes_twin, batches, pseudo, 1, 2)
        if abs(nll - mean_nll) / mean_nll / 4 > 0.003:
            best, hi = mid, mid
        else:
            lo = mid
    assert result.sigma == best and result.search == "halving" and result.labels == "pseudo"
    assert result.threshold == pytest.approx(mean_nll * (1 + 0.003 * 4), rel=1e-12)


def test_pseudo_labels_need_choice_anchors(tiny_tokenizer):
    from peft_bayes.posterior import LMBatch

    model = lora_model(tiny_tokenizer)
    enc = tiny_tokenizer(["3+4= 7"], return_tensors="pt")
    batch = LMBatch(enc["input_ids"], enc["attention_mask"], enc["input_ids"])
    with pytest.raises(InputError, match="pseudo-labels need multiple-choice anchors"):
        bayesianize(model, [batch], labels="pseudo")
    assert model.peft_config["default"].peft_type == "LORA"  # refused before the conversion
