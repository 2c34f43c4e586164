"""The predictive of a posterior on evaluation data: option probabilities of multiple-choice examples and sampled
generations, through the [`Posterior`] interface only (never a method by name).

With ``samples = N > 0`` every pass runs inside one posterior sample of the weights (fixed for the whole pass, so
batched equals one-at-a-time and a generation keeps one sample); ``samples = 0`` is one deterministic pass with the
posterior mean (the adapter as it is when it has no posterior). A posterior with a closed-form predictive (Laplace's
linearised one) computes the option probabilities its own way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch

from peft_bayes.evaluation.batching import generate_batched, make_batches
from peft_bayes.evaluation.choice_scoring import batch_path, encode_pairs, label_pairs, normalisers, score_pairs
from peft_bayes.models import pad_token_id
from peft_bayes.posterior import ChoiceBatch, Posterior, default_posterior
from peft_bayes.posterior.base import sample_seed
from peft_bayes.posterior.likelihood import IGNORE

__all__ = [
    "PairScorer",
    "averaged_option_probs",
    "averaged_pair_probs",
    "choice_batches",
    "resolve_samples",
    "sample_seed",
    "sampled_generations",
]


def resolve_samples(requested: int | None, model, posterior: Posterior | None = None) -> int:
    """``--samples``: the posterior's default (10 for a model with a posterior, else 0) for ``None``; N > 0 on a
    deterministic model is an error. ``model`` None stands for a model without a posterior."""
    return (posterior or default_posterior(model)).resolve_samples(requested)


def choice_batches(
    encoded: Sequence[Sequence[tuple[list[int], int]]],
    weights: Sequence[torch.Tensor],
    labels: Sequence[int] | None,
    batch_size: int,
    pad_id: int,
) -> list[ChoiceBatch]:
    """Differentiable (``full`` path) batches of ``batch_size`` examples, longest first.

    Args:
        encoded: per example, ``(ids, continuation tokens)`` per option (``encode_pairs``).
        weights: per example, (options,) multipliers of each option's summed log-probability (``normalisers``).
        labels: gold option per example, or None (unknown: -1).
    """
    lengths = [max(len(ids) for ids, _ in s) for s in encoded]
    batches = []
    for idx in make_batches(lengths, batch_size):
        rows = [(b, k, ids, n) for b, i in enumerate(idx) for k, (ids, n) in enumerate(encoded[i])]
        width = max(len(ids) for *_, ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (_, _, ids, n) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
            targets[r, len(ids) - n - 1 : len(ids) - 1] = torch.tensor(ids[len(ids) - n :])
        batches.append(
            ChoiceBatch(
                input_ids=input_ids,
                attention_mask=mask,
                targets=targets,
                row_weight=torch.cat([weights[i] for i in idx]).float(),
                example=torch.tensor([b for b, *_ in rows]),
                option=torch.tensor([k for _, k, *_ in rows]),
                labels=torch.tensor([labels[i] if labels is not None else -1 for i in idx]),
                index=torch.tensor(idx),
            )
        )
    return batches


class PairScorer:
    """[`OptionScorer`] over ``(context, continuation)`` pairs: tokenized once, scored with the model's current
    weights on the fast path (``scoring``) or as differentiable batches."""

    def __init__(self, model, tokenizer, pairs, batch_size: int, scoring="shared", norm="none", labels=None):
        self.model, self.tokenizer, self.pairs = model, tokenizer, pairs
        self.batch_size, self.scoring, self.norm, self.labels = batch_size, scoring, norm, labels
        self.encoded = [encode_pairs(tokenizer, p) for p in pairs]  # the same token ids in every pass
        self.n_examples = len(pairs)
        # Decided now, with the weights as they are: the packing probe run inside a posterior sample would see fresh
        # noise on every forward (BayesLoRA's forward draws, element dropout) and take packing for inexact.
        batch_path(model, scoring)

    def for_model(self, model) -> PairScorer:
        """The same examples (tokenized once) scored by another model, e.g. the one TFB makes of this one."""
        other = copy.copy(self)
        other.model = model
        return other

    def scores(self, progress: Callable | None = None) -> list[torch.Tensor]:
        return score_pairs(
            self.model, self.tokenizer, self.pairs, self.batch_size, progress, self.scoring, self.norm, self.encoded
        )

    def batches(self, batch_size: int | None = None) -> Iterable[ChoiceBatch]:
        pad_id = pad_token_id(self.tokenizer)
        weights = [1.0 / normalisers(p, s, self.norm) for p, s in zip(self.pairs, self.encoded)]
        return choice_batches(self.encoded, weights, self.labels, batch_size or self.batch_size, pad_id)


def averaged_option_probs(
    model, tokenizer, prompts, options, prefix: str, batch_size: int, samples: int, seed: int, progress=None
) -> list[torch.Tensor]:
    """Label-format option probabilities averaged over the posterior samples (see :func:`averaged_pair_probs`)."""
    pairs = [label_pairs(p, opts, prefix) for p, opts in zip(prompts, options)]
    return averaged_pair_probs(model, tokenizer, pairs, batch_size, samples, seed, progress)


def averaged_pair_probs(
    model,
    tokenizer,
    pairs,
    batch_size: int,
    samples: int,
    seed: int,
    progress=None,
    scoring="shared",
    norm="none",
    posterior: Posterior | None = None,
    labels: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Predictive option probabilities of ``posterior`` (default: the one ``model`` carries), averaged over
    ``samples`` posterior samples (probabilities, not logits, are averaged) or in the posterior's closed form.

    ``pairs``: per example, one ``(context, continuation)`` per option (``choice_scoring.label_pairs`` /
    ``cloze_pairs``); ``scoring`` and ``norm`` as in ``choice_scoring.score_pairs``.

    Returns:
        One (len(pairs[i]),) float64 tensor per example, summing to 1.
    """
    scorer = PairScorer(model, tokenizer, pairs, batch_size, scoring, norm, labels)
    return (posterior or default_posterior(model)).option_probs(scorer, samples, seed, progress)


def sampled_generations(
    model,
    tokenizer,
    prompts,
    samples: int,
    seed: int,
    gen: dict,
    progress: Callable | None = None,
    posterior: Posterior | None = None,
) -> list[list[str]]:
    """Greedy generations per pass (posterior sample): ``[pass][example]``."""
    passes = []
    for context, tick in (posterior or default_posterior(model)).passes(samples, seed, progress):
        with context:
            passes.append(generate_batched(model, tokenizer, prompts, progress=tick, **gen))
    return passes
