"""Generated answers put to a vote over posterior samples: the majority answer, its vote share as the confidence,
and the calibration of that confidence (ECE, AUROC of right against wrong answers)."""

from __future__ import annotations

from collections.abc import Sequence

from peft_bayes.data.answers import TaskSpec, extract_answer, is_correct
from peft_bayes.evaluation.calibration import ECE_BINS
from peft_bayes.metrics import auroc, confidence_calibration_error

NO_ANSWER = "no answer"


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most frequent answer and its vote share. ``None`` (nothing extracted) is an answer of its own; ties go
    to the answer that appeared first (smallest sample index)."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    counts: dict[str | None, int] = {}  # insertion order = order of first appearance
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    best = max(counts, key=counts.__getitem__)  # max keeps the first of equal counts
    return best, counts[best] / len(answers)


def vote_rows(records, prompts, responses: list[list[str]], task: TaskSpec) -> list[dict]:
    """Per-example records of a generation-vote evaluation; ``responses[pass][example]``."""
    rows = []
    for i, (rec, prompt) in enumerate(zip(records, prompts)):
        texts = [r[i] for r in responses]
        votes = [extract_answer(t, task) for t in texts]
        answer, share = majority_vote(votes)
        row = {
            "instruction": rec["instruction"],
            "prompt": prompt,
            "generation": texts[votes.index(answer)],
            "extracted": answer,
            "gold": rec["answer"],
            "correct": bool(is_correct(answer, rec["answer"], task)),
            "confidence": share,
        }
        if len(texts) > 1:
            row["votes"] = [NO_ANSWER if v is None else v for v in votes]
            row["generations"] = texts
        rows.append(row)
    return rows


def vote_metrics(confidence: Sequence[float], correct: Sequence[bool]) -> dict:
    """Accuracy (%), ECE (%) of the vote share, and AUROC of the vote share for correct vs wrong answers."""

    n_right = sum(bool(c) for c in correct)
    out = {
        "accuracy_percent": 100 * n_right / len(correct),
        "ece_percent": 100 * confidence_calibration_error(confidence, [float(c) for c in correct], ECE_BINS),
        "ece_bins": ECE_BINS,
        "auroc": None,
    }
    if 0 < n_right < len(correct):
        out["auroc"] = auroc(confidence, correct)
    else:
        out["auroc_note"] = f"undefined: {'all' if n_right else 'no'} answers correct"
    return out
