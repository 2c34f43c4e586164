"""Bayesian evaluation for evaluate.py: posterior-sample passes, sample-averaged option probabilities, majority
votes over sampled generations, calibration metrics and out-of-distribution detection.

With ``samples = N > 0`` every pass runs inside ``posterior_sample(model, seed)``: one fixed draw of every
BayesLoRA layer's weights for the whole pass, so batched equals one-at-a-time and a generation uses one sample.
``samples = 0`` is one deterministic pass with the posterior mean (or the plain adapter when it has no posterior).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from peft_bayes.cli.batching import generate_batched
from peft_bayes.cli.choice_scoring import encode_pairs, label_pairs, option_probabilities, score_pairs
from peft_bayes.data.answers import TaskSpec, extract_answer, is_correct
from peft_bayes.errors import InputError
from peft_bayes.tuners.bayeslora import is_bayesian, posterior_sample, sampling

DEFAULT_SAMPLES = 10
ECE_BINS = 15
NO_ANSWER = "no answer"


def has_posterior(model) -> bool:
    """Whether ``model`` holds an active BayesLoRA adapter (a posterior to sample from); None has none."""
    return model is not None and is_bayesian(model)


def resolve_samples(requested: int | None, model) -> int:
    """``--samples``: default 10 for a model with a posterior, else 0; N > 0 without a posterior is an error."""
    bayesian = has_posterior(model)
    if requested is None:
        return DEFAULT_SAMPLES if bayesian else 0
    if requested > 0 and not bayesian:
        raise InputError(
            f"--samples {requested} needs an adapter with a posterior (bayeslora); "
            "this one is deterministic: use --samples 0"
        )
    return requested


def sample_seed(seed: int, index: int) -> int:
    """Seed of posterior sample ``index`` under ``--seed seed`` (distinct for distinct pairs, index < 100003)."""
    return seed * 100003 + index


def posterior_passes(model, samples: int, seed: int, progress: Callable | None = None) -> Iterator[tuple]:
    """One ``(context, tick)`` per evaluation pass: ``samples`` posterior draws, or one posterior-mean pass when 0.

    ``tick(done, n)``, called by the pass, reports ``progress(done so far over all passes, total)``; None without
    ``progress``.
    """
    n_passes = max(samples, 1)
    contexts = (
        [sampling(model, False) if is_bayesian(model) else contextlib.nullcontext()]
        if samples == 0
        else (posterior_sample(model, seed=sample_seed(seed, index)) for index in range(samples))
    )
    for index, context in enumerate(contexts):
        tick = (lambda done, n, index=index: progress(index * n + done, n_passes * n)) if progress else None
        yield context, tick


def averaged_option_probs(
    model, tokenizer, prompts, options, prefix: str, batch_size: int, samples: int, seed: int, progress=None
) -> list[torch.Tensor]:
    """Label-format option probabilities averaged over the posterior samples (see :func:`averaged_pair_probs`)."""
    pairs = [label_pairs(p, opts, prefix) for p, opts in zip(prompts, options)]
    return averaged_pair_probs(model, tokenizer, pairs, batch_size, samples, seed, progress)


def averaged_pair_probs(
    model, tokenizer, pairs, batch_size: int, samples: int, seed: int, progress=None, scoring="shared", norm="none"
) -> list[torch.Tensor]:
    """Option probabilities averaged over the posterior samples (probabilities, not logits, are averaged).

    ``pairs``: per example, one ``(context, continuation)`` per option (``choice_scoring.label_pairs`` /
    ``cloze_pairs``); ``scoring`` and ``norm`` as in ``choice_scoring.score_pairs``.

    Returns:
        One (len(pairs[i]),) float64 tensor per example, summing to 1.
    """
    total: list[torch.Tensor] | None = None
    encoded = [encode_pairs(tokenizer, p) for p in pairs]  # the same token ids in every pass
    for context, tick in posterior_passes(model, samples, seed, progress):
        with context:
            scores = score_pairs(model, tokenizer, pairs, batch_size, tick, scoring, norm, encoded)
        probs = option_probabilities(scores)
        total = probs if total is None else [t + p for t, p in zip(total, probs)]
    return [t / max(samples, 1) for t in total]


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
    from peft_bayes.metrics import classification_report

    return classification_report(probs_matrix(probs), torch.tensor(golds), n_bins=ECE_BINS)


def ood_metrics(id_probs: Sequence[torch.Tensor], ood_probs: Sequence[torch.Tensor]) -> dict:
    """AUROC of the predictive entropy separating OOD (positive) from in-distribution examples."""
    from peft_bayes.metrics import auroc

    id_h = [predictive_entropy(p) for p in id_probs]
    ood_h = [predictive_entropy(p) for p in ood_probs]
    return {
        "ood_auroc": auroc(id_h + ood_h, [False] * len(id_h) + [True] * len(ood_h)),
        "ood_n": len(ood_h),
        "id_entropy_mean_nats": sum(id_h) / len(id_h),
        "ood_entropy_mean_nats": sum(ood_h) / len(ood_h),
    }


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


def sampled_generations(
    model, tokenizer, prompts, samples: int, seed: int, gen: dict, progress: Callable | None = None
) -> list[list[str]]:
    """Greedy generations per pass (posterior sample): ``[pass][example]``."""
    passes = []
    for context, tick in posterior_passes(model, samples, seed, progress):
        with context:
            passes.append(generate_batched(model, tokenizer, prompts, progress=tick, **gen))
    return passes


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
    from peft_bayes.metrics import auroc, confidence_calibration_error

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


def write_reliability(probs: Sequence[torch.Tensor], golds: Sequence[int], path: str, title: str) -> str | None:
    """Reliability diagram PNG of the averaged option distributions; None (with a note) without matplotlib."""
    from peft_bayes.metrics import reliability_diagram

    try:
        return reliability_diagram(probs_matrix(probs), torch.tensor(golds), path, n_bins=ECE_BINS, title=title)
    except ImportError as err:
        print(f"note: no reliability diagram ({err})")
        return None
