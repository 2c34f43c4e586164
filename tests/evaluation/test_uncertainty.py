"""Token- and answer-level uncertainty against the definitions written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peft_bayes.data.answers import get_task
from peft_bayes.evaluation.uncertainty import Thresholds, agreement, describe, normalise_answer, token_uncertainty


def _by_hand(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]]:
    """Per token: the draws' softmaxes as Python floats, then each quantity from its definition."""
    n, t, v = logits.shape
    out = {"bma_prob": [], "predictive_entropy": [], "expected_entropy": [], "mutual_information": []}
    for j in range(t):
        probs = []
        for i in range(n):
            row = [math.exp(float(x)) for x in logits[i, j]]
            z = sum(row)
            probs.append([x / z for x in row])
        bma = [sum(p[k] for p in probs) / n for k in range(v)]
        predictive = -sum(q * math.log(q) for q in bma if q > 0)
        expected = sum(-sum(q * math.log(q) for q in p if q > 0) for p in probs) / n
        out["bma_prob"].append(bma[int(targets[j])])
        out["predictive_entropy"].append(predictive)
        out["expected_entropy"].append(expected)
        out["mutual_information"].append(predictive - expected)
    return out


def test_token_quantities_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 6, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (6,), generator=gen)
    got = token_uncertainty(logits, targets)
    want = _by_hand(logits, targets)
    for key, values in want.items():
        torch.testing.assert_close(got[key], torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (got["mutual_information"] > 1e-3).all()  # five different draws disagree somewhere on every token


def test_identical_draws_have_no_epistemic_part():
    logits = torch.randn(1, 4, 9, dtype=torch.float64).expand(6, -1, -1)
    got = token_uncertainty(logits, torch.tensor([0, 3, 8, 2]))
    # The mean of six equal float64 probabilities can differ from each in the last bit (the summation order depends on
    # the CPU's vector width), so "zero" is zero up to a few ulps of an entropy of order 1.
    torch.testing.assert_close(got["mutual_information"], torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(got["expected_entropy"], got["predictive_entropy"], rtol=1e-14, atol=1e-15)


def test_float32_logits_are_scored_in_float64():
    logits = torch.randn(3, 2, 5)
    got = token_uncertainty(logits, torch.tensor([1, 4]))
    assert all(v.dtype == torch.float64 for v in got.values())
    with pytest.raises(ValueError, match="draws, tokens, vocab"):
        token_uncertainty(logits, torch.tensor([1, 4, 0]))


def test_vote_share_of_extracted_math_answers():
    task = get_task("gsm8k")
    samples = ["so the answer is 42", "42.", "I think 41", "no idea", "The answer is 42.0"]
    got = agreement("Answer: 42", samples, task)
    assert got["main_key"] in {"42", "42.0"} and got["agree"] == 3 and got["n"] == 5
    assert [g["votes"] for g in got["groups"]] == [3, 1, 1]
    assert got["groups"][0]["share"] == pytest.approx(0.6)
    assert {g["answer"] for g in got["groups"][1:]} == {"41", "no answer"}


def test_free_text_groups_by_normalised_text():
    assert normalise_answer("  Paris.\n") == normalise_answer("paris") == "paris"
    got = agreement("Paris", ["paris.", "PARIS", "Lyon", "  paris "])
    assert got["agree"] == 3 and got["groups"][1] == {"answer": "lyon", "votes": 1, "share": 0.25}


def test_describe_marks_the_most_epistemic_tokens_and_calls_the_answer():
    metrics = {
        "bma_prob": torch.tensor([0.9, 0.2, 0.8, 0.95]),
        "predictive_entropy": torch.tensor([0.3, 1.5, 0.5, 0.1]),
        "expected_entropy": torch.tensor([0.3, 0.5, 0.2, 0.1]),
        "mutual_information": torch.tensor([0.0, 1.0, 0.3, 0.0]),
    }
    tokens = ["The", " answer", " is", " 4"]
    got = describe("The answer is 4", tokens, [1, 2, 3, 4], metrics, ["4", "4", "5", "4"], draws=4,
                   thresholds=Thresholds(marked=2))  # fmt: skip
    assert got.marked == [1, 2]  # the two largest mutual informations, in token order
    assert got.totals["mutual_information"] == pytest.approx(1.3)
    assert got.means["expected_entropy"] == pytest.approx(1.1 / 4)
    assert got.confidence == pytest.approx((0.9 * 0.2 * 0.8 * 0.95) ** 0.25)
    assert got.agreement["agree"] == 0  # free text: "the answer is 4" is not "4"
    assert got.verdict == "uncertain"
    line = got.summary_line()
    assert line.startswith("uncertain") and "agreement 0/4" in line and "epistemic 1.300 nats" in line
    point = describe("4", [" 4"], [4], {k: v[3:] for k, v in metrics.items()}, [], draws=1)
    assert point.verdict == "confident" and point.agreement is None and point.marked == [0]
