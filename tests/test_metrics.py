"""Metrics against independent computations: plain-Python loops, brute-force pair counts and hand-worked cases."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from peft_bayes import metrics


def _random_case(n=500, k=4, seed=0, sharpness=3.0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(n, k, generator=gen, dtype=torch.float64), -1)
    # Labels drawn from the predictions themselves, so the model is roughly calibrated but not perfectly.
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return probs, labels


def _ece_loop(probs, labels, n_bins):
    """Top-label ECE with (lower, upper] bins, written as a loop over plain floats."""
    rows = [(max(p), p.index(max(p)) == y) for p, y in zip(probs.tolist(), labels.tolist())]
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        members = [(c, ok) for c, ok in rows if (lo < c <= hi) or (i == 0 and c == 0)]
        if members:
            acc = sum(ok for _, ok in members) / len(members)
            conf = sum(c for c, _ in members) / len(members)
            total += abs(acc - conf) * len(members) / len(rows)
    return total


@pytest.mark.parametrize("seed,k,n_bins", [(0, 4, 15), (1, 2, 15), (2, 10, 10), (3, 5, 1)])
def test_ece_matches_a_plain_loop(seed, k, n_bins):
    probs, labels = _random_case(k=k, seed=seed)
    assert metrics.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        _ece_loop(probs, labels, n_bins), abs=1e-12
    )


def test_ece_hand_worked():
    # Two rows at confidence 0.9 (one right, one wrong) and one at 0.6 (right), 15 bins:
    # bin of 0.9: |0.5 - 0.9| * 2/3; bin of 0.6: |1 - 0.6| * 1/3.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    assert metrics.accuracy(probs, labels) == pytest.approx(2 / 3)


def test_ece_bin_edges_are_closed_on_the_right():
    # A confidence exactly on the edge 0.6 with 5 bins belongs to (0.4, 0.6], not (0.6, 0.8].
    edge = torch.linspace(0, 1, 6, dtype=torch.float64)[3]
    bins = metrics.calibration_bins(torch.stack([edge, 1 - edge])[None], torch.tensor([0]), n_bins=5)
    assert bins["count"].tolist() == [0, 0, 1, 0, 0]


def test_perfectly_confident_and_right_is_zero_error():
    probs, labels = torch.eye(3)[[0, 2, 1, 1]], torch.tensor([0, 2, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == 0
    assert metrics.brier_score(probs, labels) == 0
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(0, abs=1e-12)
    assert metrics.accuracy(probs, labels) == 1


def test_nll_and_brier_against_torch_and_a_loop():
    probs, labels = _random_case(k=6, seed=4)
    nll = torch.nn.functional.nll_loss(probs.log(), labels).item()
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(nll, rel=1e-12)
    brier = sum(
        sum((p - (j == y)) ** 2 for j, p in enumerate(row)) for row, y in zip(probs.tolist(), labels.tolist())
    ) / len(labels)
    assert metrics.brier_score(probs, labels) == pytest.approx(brier, rel=1e-12)


def test_nll_of_a_certain_miss_is_large_but_finite():
    nll = metrics.negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert nll == pytest.approx(-math.log(metrics.NLL_FLOOR))


def _auroc_pairs(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pair_counting_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (200,), generator=gen).double()  # many ties
    positive = torch.rand(200, generator=gen) < 0.3 + 0.03 * scores
    assert metrics.auroc(scores, positive) == pytest.approx(_auroc_pairs(scores.tolist(), positive.tolist()))


def test_auroc_extremes():
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0
    assert metrics.auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="needs both classes"):
        metrics.auroc([0.1, 0.2], [1, 1])


def test_report_units():
    probs, labels = _random_case(seed=5)
    report = metrics.classification_report(probs, labels)
    assert report["accuracy_percent"] == pytest.approx(100 * metrics.accuracy(probs, labels))
    assert report["ece_percent"] == pytest.approx(100 * metrics.expected_calibration_error(probs, labels))
    assert report["nll_nats"] == metrics.negative_log_likelihood(probs, labels)
    assert report["brier_sum_over_classes"] == metrics.brier_score(probs, labels)
    assert report["n"] == 500 and report["ece_bins"] == 15


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        ([[0.5, 0.5]], [2], r"labels must be in \[0, 2\)"),
        ([[2.0, -1.0]], [0], "non-negative"),
        ([[0.2, 0.2]], [0], "sum to 1"),
        ([0.5, 0.5], [0], r"expected probs \(n, k\)"),
    ],
)
def test_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.accuracy(torch.tensor(probs), torch.tensor(labels))


def test_reliability_diagram_png(tmp_path):
    pytest.importorskip("matplotlib", reason="reliability diagrams need the plot extra (matplotlib)")
    probs, labels = _random_case(seed=6)
    path = metrics.reliability_diagram(probs, labels, str(tmp_path / "sub" / "reliability.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # the IHDR chunk is intact
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["reliability.png"]  # no temp file left
