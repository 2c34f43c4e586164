"""Token- and answer-level uncertainty of a generated answer under N posterior draws of the adapter weights.

Token level: the answer teacher-forced under each draw gives N next-token distributions p_n per position. With
p̄ = mean_n p_n (the Bayesian model average),

- ``bma_prob``: p̄ of the answer's token;
- ``predictive_entropy``: H[p̄], the total uncertainty;
- ``expected_entropy``: mean_n H[p_n], the aleatoric part (what every draw is unsure of);
- ``mutual_information``: H[p̄] − mean_n H[p_n] ≥ 0, the epistemic part (BALD: where the draws disagree).

A point estimate (one draw) has mutual information 0 and expected entropy equal to the predictive entropy.

Answer level: the answers generated one per draw, grouped by their extracted final answer (math-style tasks, the
extraction evaluate.py scores with) or by their normalised text, and the share of draws that agree with the main
answer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from peft_bayes.data.answers import TaskSpec, extract_answer

CONFIDENT = "confident"
UNCERTAIN = "uncertain"


def token_uncertainty(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token uncertainty of ``targets`` (T,) under N draws' ``logits`` (N, T, V), in nats, float64.

    Returns:
        ``bma_prob``, ``predictive_entropy``, ``expected_entropy``, ``mutual_information``: (T,) tensors.
    """
    if logits.dim() != 3 or logits.shape[1] != targets.shape[0]:
        raise ValueError(f"logits must be (draws, tokens, vocab) with tokens = {targets.shape[0]}, got {logits.shape}")
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    n = logp.shape[0]
    log_bma = torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(n), dtype=torch.float64))
    bma = log_bma.exp()
    predictive = -(bma * log_bma).sum(-1)
    expected = -(logp.exp() * logp).sum(-1).mean(0)
    mutual = (predictive - expected).clamp_min(0.0)  # >= 0 by Jensen; the clamp removes rounding below zero
    index = targets.to(logits.device).long().view(-1, 1)
    return {
        "bma_prob": bma.gather(-1, index).squeeze(-1),
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": mutual,
    }


def normalise_answer(text: str) -> str:
    """Lower case, punctuation at the ends and repeated white space removed: the exact-match key of free text."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


def answer_key(text: str, task: TaskSpec | None) -> str:
    """The group an answer belongs to: its extracted final answer for a task (``"no answer"`` when none), else
    its normalised text."""
    if task is None:
        return normalise_answer(text)
    answer = extract_answer(text, task)
    return "no answer" if answer is None else str(answer)


def agreement(main: str, samples: Sequence[str], task: TaskSpec | None = None) -> dict:
    """How the sampled answers agree with the main one: the main answer's key, the number of samples in its group,
    and every group with its vote share (largest first, ties in order of first appearance)."""
    key = answer_key(main, task)
    counts: dict[str, int] = {}
    for text in samples:
        k = answer_key(text, task)
        counts[k] = counts.get(k, 0) + 1
    n = len(samples)
    groups = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: equal counts keep their first appearance
    return {
        "main_key": key,
        "agree": counts.get(key, 0),
        "n": n,
        "groups": [{"answer": k, "votes": c, "share": c / n} for k, c in groups],
    }


@dataclass
class Thresholds:
    """When an answer is called uncertain: its confidence (geometric mean of the BMA token probabilities) below
    ``confidence``, fewer than ``agreement`` of the draws agreeing with it, or a mean epistemic part (mutual
    information per token) above ``epistemic`` nats. ``marked``: how many of its most uncertain tokens are marked."""

    confidence: float = 0.5
    agreement: float = 0.5
    epistemic: float = 0.05
    marked: int = 3


@dataclass
class AnswerUncertainty:
    """Everything generate.py shows for one answer (``to_dict`` for ``--json``)."""

    answer: str
    tokens: list[str]
    token_ids: list[int]
    per_token: dict[str, list[float]]
    totals: dict[str, float]
    means: dict[str, float]
    confidence: float
    samples: list[str]
    agreement: dict | None
    marked: list[int]
    verdict: str
    draws: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        """One line a person reads at a glance."""
        parts = [f"{self.verdict}", f"confidence {self.confidence:.2f}"]
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement['agree']}/{self.agreement['n']}")
        parts.append(f"epistemic {self.totals['mutual_information']:.3f} nats")
        parts.append(f"aleatoric {self.totals['expected_entropy']:.3f} nats")
        parts.append(f"{self.draws} draw{'s' if self.draws != 1 else ''}")
        return " · ".join(parts)


def most_uncertain(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest positive ``scores``, in token order."""
    ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: -scores[i])
    return sorted(ranked[:k])


def describe(
    answer: str,
    tokens: list[str],
    token_ids: list[int],
    metrics: dict[str, torch.Tensor],
    samples: Sequence[str],
    draws: int,
    task: TaskSpec | None = None,
    thresholds: Thresholds | None = None,
) -> AnswerUncertainty:
    """The answer-level view of ``token_uncertainty``'s ``metrics`` and the sampled answers."""
    th = thresholds or Thresholds()
    per_token = {k: [float(x) for x in v] for k, v in metrics.items()}
    t = max(len(token_ids), 1)
    totals = {k: float(sum(v)) for k, v in per_token.items() if k != "bma_prob"}
    log_conf = float(torch.log(metrics["bma_prob"].clamp_min(1e-300)).sum()) if token_ids else 0.0
    totals["log_prob"] = log_conf
    means = {k: v / t for k, v in totals.items()}
    confidence = float(torch.exp(torch.tensor(log_conf / t)))
    agree = agreement(answer, samples, task) if samples else None
    # the epistemic part marks the tokens where the draws disagree; a point estimate has none, so its total
    # uncertainty marks them instead
    score = per_token["mutual_information"] if draws > 1 else per_token["predictive_entropy"]
    marked = most_uncertain(score, th.marked)
    sure = confidence >= th.confidence and means["mutual_information"] <= th.epistemic
    if agree is not None:
        sure = sure and agree["agree"] / agree["n"] >= th.agreement
    return AnswerUncertainty(
        answer=answer,
        tokens=tokens,
        token_ids=token_ids,
        per_token=per_token,
        totals=totals,
        means=means,
        confidence=confidence,
        samples=list(samples),
        agreement=agree,
        marked=marked,
        verdict=CONFIDENT if sure else UNCERTAIN,
        draws=draws,
    )
