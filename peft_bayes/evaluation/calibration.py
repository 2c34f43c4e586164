"""The metric glue of multiple-choice evaluation: per-example records, accuracy / ECE / NLL / Brier of the
predictive option distributions, entropy-based OOD detection and the reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_bayes.metrics import auroc, classification_report, reliability_diagram

ECE_BINS = 15


def probs_matrix(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, max options) float64, each row zero-padded past its example's options."""
    out = torch.zeros(len(probs), max(len(p) for p in probs), dtype=torch.float64)
    for i, p in enumerate(probs):
        out[i, : len(p)] = p
    return out


def predictive_entropy(probs: torch.Tensor) -> float:
    """Entropy in nats of one predictive distribution (0 log 0 = 0)."""
    p = probs[probs > 0]
    return float(-(p * p.log()).sum())


def choice_rows(records, prompts, options, golds, probs, texts=None) -> list[dict]:
    """Per-example prediction records of a multiple-choice evaluation; ``texts``: the options' texts (cloze)."""
    rows = []
    for i, (rec, prompt, opts, gold, p) in enumerate(zip(records, prompts, options, golds, probs)):
        pred = int(p.argmax())
        row = {"instruction": rec["instruction"], "prompt": prompt, "options": list(opts)}
        if texts is not None:
            row["option_texts"] = list(texts[i])
        row.update({"probs": [float(x) for x in p], "prediction": opts[pred], "gold": rec["answer"]})
        row["correct"] = pred == gold
        rows.append(row)
    return rows


def choice_metrics(probs: Sequence[torch.Tensor], golds: Sequence[int]) -> dict:
    """Accuracy (%), ECE (%), NLL (nats) and Brier of the averaged option distributions."""

    return classification_report(probs_matrix(probs), torch.tensor(golds), n_bins=ECE_BINS)


def ood_metrics(id_probs: Sequence[torch.Tensor], ood_probs: Sequence[torch.Tensor]) -> dict:
    """AUROC of the predictive entropy separating OOD (positive) from in-distribution examples."""

    id_h = [predictive_entropy(p) for p in id_probs]
    ood_h = [predictive_entropy(p) for p in ood_probs]
    return {
        "ood_auroc": auroc(id_h + ood_h, [False] * len(id_h) + [True] * len(ood_h)),
        "ood_n": len(ood_h),
        "id_entropy_mean_nats": sum(id_h) / len(id_h),
        "ood_entropy_mean_nats": sum(ood_h) / len(ood_h),
    }


def write_reliability(probs: Sequence[torch.Tensor], golds: Sequence[int], path: str, title: str) -> str | None:
    """Reliability diagram PNG of the averaged option distributions; None (with a note) without matplotlib."""

    try:
        return reliability_diagram(probs_matrix(probs), torch.tensor(golds), path, n_bins=ECE_BINS, title=title)
    except ImportError as err:
        print(f"note: no reliability diagram ({err})")
        return None
