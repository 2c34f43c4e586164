"""Accuracy and calibration metrics for classifiers that output probabilities, and a reliability diagram.

All functions take ``probs`` of shape (n, k) (rows are predictive distributions over k classes, e.g. averaged over
posterior samples) and integer ``labels`` of shape (n,), and return Python floats as *fractions* (NLL in nats).
``classification_report`` converts to the units the Bayesian-PEFT papers report (BLoB, Laplace-LoRA: accuracy and
ECE in percent, NLL in nats, Brier as a sum over classes) and names the unit in every key.

Definitions:
  - accuracy: share of rows whose arg-max class is the label;
  - ECE: top-label expected calibration error with ``n_bins`` equal-width bins on [0, 1] (the torchmetrics
    definition): sum over bins of |accuracy(bin) - mean confidence(bin)| * share of rows in the bin; bin i holds
    the confidences c with edge[i] < c <= edge[i + 1], edges = linspace(0, 1, n_bins + 1) (c = 0 goes to the first);
  - NLL: mean of -log p(label), with p clamped at 1e-12 so a confident miss is large but finite;
  - Brier: mean over rows of sum over classes (p_k - 1[k = label])^2, in [0, 2];
  - AUROC: probability that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U from mid-ranks).
"""

from __future__ import annotations

import os
import tempfile

import torch

NLL_FLOOR = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or probs.shape[0] == 0:
        raise ValueError(
            f"expected probs (n, k) and labels (n,), n > 0; got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if ((probs.sum(-1) - 1).abs() > 1e-4).any():
        raise ValueError("each row of probs must sum to 1 (pass probabilities, not logits)")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be in [0, {probs.shape[1]}), got {labels.min().item()}..{labels.max().item()}")
    return probs, labels


def accuracy(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def calibration_bins(probs, labels, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per-bin ``count``, ``accuracy`` and mean ``confidence`` of the top label (empty bins: count 0, NaN means)."""
    probs, labels = _check(probs, labels)
    confidence, predicted = probs.max(-1)
    return _bin_stats(confidence, (predicted == labels).double(), n_bins)


def confidence_bins(confidence, correct, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per-bin ``count``, ``accuracy`` and mean ``confidence`` of stated confidences against 0/1 correctness."""
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    return _bin_stats(confidence, torch.as_tensor(correct, dtype=torch.float64).flatten(), n_bins)


def _bin_stats(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> dict[str, torch.Tensor]:
    # bucketize(right=False) gives i with edges[i-1] < c <= edges[i]: bins are closed on the right.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges) - 1).clamp(0, n_bins - 1)  # (n,) bin of each row
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    return {"count": count, "accuracy": acc_sum / count, "confidence": conf_sum / count}


def _ece_from_bins(bins: dict[str, torch.Tensor]) -> float:
    filled = bins["count"] > 0
    gaps = (bins["accuracy"][filled] - bins["confidence"][filled]).abs()
    return (gaps * bins["count"][filled]).sum().item() / bins["count"].sum().item()


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    return _ece_from_bins(calibration_bins(probs, labels, n_bins))


def confidence_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE of stated confidences (e.g. majority-vote shares) against 0/1 correctness, same bins as
    ``expected_calibration_error``. Unlike a top-label probability, a confidence may lie below 1/k."""
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    correct = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if confidence.shape != correct.shape or confidence.numel() == 0:
        raise ValueError("confidence_calibration_error needs non-empty confidence and correct of the same length")
    if not torch.isfinite(confidence).all() or (confidence < 0).any() or (confidence > 1).any():
        raise ValueError("confidences must lie in [0, 1]")
    return _ece_from_bins(_bin_stats(confidence, correct, n_bins))


def negative_log_likelihood(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    return -picked.clamp_min(NLL_FLOOR).log().mean().item()


def brier_score(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for boolean ``positive`` labels."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive, dtype=torch.bool).flatten()
    if scores.shape != positive.shape or not torch.isfinite(scores).all():
        raise ValueError("auroc needs finite scores and labels of the same length")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes; got {n_pos} positive and {n_neg} negative")
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Ties share the mean of the ranks they span.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def classification_report(probs, labels, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL and Brier in the papers' units; the unit is part of each key."""
    return {
        "accuracy_percent": 100 * accuracy(probs, labels),
        "ece_percent": 100 * expected_calibration_error(probs, labels, n_bins),
        "nll_nats": negative_log_likelihood(probs, labels),
        "brier_sum_over_classes": brier_score(probs, labels),
        "n": int(torch.as_tensor(labels).numel()),
        "ece_bins": n_bins,
    }


def reliability_diagram(probs, labels, path: str, n_bins: int = 15, title: str | None = None) -> str:
    """Writes a PNG: per-bin accuracy against confidence, the diagonal, and the bin counts. Needs matplotlib
    (``pip install 'peft_bayes[plot]'``). The file appears complete or not at all."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("reliability diagrams need matplotlib: pip install 'peft_bayes[plot]'") from None
    bins = calibration_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = torch.linspace(0, 1, n_bins + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    filled = (bins["count"] > 0).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], bins["accuracy"].numpy()[filled], width=1 / n_bins, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title or f"ECE {100 * ece:.2f}% ({n_bins} bins, n = {int(bins['count'].sum())})")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"].numpy(), width=1 / n_bins, edgecolor="black")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120)


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 120) -> str:
    """Saves a matplotlib figure to a temp file beside ``path``, renames it over ``path`` and closes the figure: the
    file appears complete or not at all."""
    import matplotlib.pyplot as plt

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)
