"""The two likelihoods a posterior is fitted and evaluated with, as differentiable functions of the model.

- ``choice``: a categorical over each example's answer options. The option scores are the (normalised) summed
  log-probabilities of each option's continuation tokens, exactly what evaluation scores, computed on the ``full``
  path (one row per option) so they can be differentiated; the categorical's logits are these scores.
- ``lm``: token-level next-token likelihood of the response tokens (labels, ``-100`` elsewhere), for generation
  tasks.

Batches are plain tensors built by the evaluation / data layers; this module only needs torch and the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peft_bayes.models import model_device

IGNORE = -100


@dataclass
class ChoiceBatch:
    """``B`` multiple-choice examples as ``R`` rows, one per (example, option).

    Attributes:
        input_ids, attention_mask: (R, L) right-padded context + continuation of each option.
        targets: (R, L) the token position ``t`` predicts (``input_ids[r, t + 1]``) where it belongs to the
            continuation, ``-100`` elsewhere.
        row_weight: (R,) multiplier of each row's summed log-probability (1, 1 / tokens or 1 / characters).
        example: (R,) the example (0..B-1) of each row; ``option``: (R,) its option index.
        labels: (B,) the gold option of each example (-1 where unknown).
        index: (B,) each example's index in the whole data set.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    row_weight: torch.Tensor
    example: torch.Tensor
    option: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    @property
    def n_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_options(self) -> int:
        return int(self.option.max()) + 1

    def to(self, device) -> ChoiceBatch:
        return ChoiceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


@dataclass
class LMBatch:
    """Token-level batch: (B, L) ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` = not scored)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_examples(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> LMBatch:
        return LMBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def row_scores(model, batch: ChoiceBatch) -> torch.Tensor:
    """(R,) differentiable score of every row: ``row_weight * sum of the continuation's log-probabilities``.

    Log-softmax runs in at least float32 whatever the model dtype.
    """
    batch = batch.to(model_device(model))
    rows, cols = (batch.targets != IGNORE).nonzero(as_tuple=True)
    kwargs, column = _keep_positions(model, cols)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
    if kwargs:
        picked = logits[rows, column]
    else:
        picked = logits[:, -batch.input_ids.shape[1] :][rows, cols]  # prompt learning prepends virtual tokens
    # Only the continuation's positions are normalised: a (scored tokens, V) log-softmax, not (R, L, V).
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    token_lp = picked.log_softmax(-1).gather(-1, batch.targets[rows, cols][:, None]).squeeze(-1)
    out = token_lp.new_zeros(batch.input_ids.shape[0]).index_add(0, rows, token_lp)
    return out * batch.row_weight.to(token_lp.dtype)


def choice_scores(model, batch: ChoiceBatch) -> torch.Tensor:
    """(B, K) option scores (the categorical's logits), ``-inf`` where an example has fewer than K options."""
    rows = row_scores(model, batch)
    return scores_matrix(rows, batch)


def scores_matrix(rows: torch.Tensor, batch: ChoiceBatch) -> torch.Tensor:
    """(B, K) from (R,) row scores, ``-inf`` padded."""
    out = rows.new_full((batch.n_examples, batch.n_options), float("-inf"))
    return out.index_put((batch.example.to(rows.device), batch.option.to(rows.device)), rows)


def choice_nll(model, batch: ChoiceBatch) -> torch.Tensor:
    """Summed negative log-likelihood of the gold options of ``batch`` (examples with label -1 are skipped)."""
    scores = choice_scores(model, batch)
    labels = batch.labels.to(scores.device)
    known = labels >= 0
    return -scores[known].log_softmax(-1).gather(1, labels[known][:, None]).sum()


def lm_logits(model, batch: LMBatch) -> torch.Tensor:
    """(B, L, V) logits aligned with ``batch.input_ids`` (virtual tokens of prompt learning dropped)."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, -batch.input_ids.shape[1] :]


def lm_nll(model, batch: LMBatch) -> torch.Tensor:
    """Summed negative log-likelihood of the next-token labels (``labels[t]`` is predicted at ``t - 1``)."""
    logits = lm_logits(model, batch)[:, :-1]
    labels = batch.labels.to(logits.device)[:, 1:]
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    scored = labels != IGNORE
    return -(logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * scored).sum()


def letter_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, choice_ids: torch.Tensor):
    """(B, K) logits of the K option letters at each row's last real position (the letter format's answer slot).

    ``input_ids`` / ``attention_mask``: (B, L) right-padded contexts ending in ``"Answer:"``; ``choice_ids``: (B, K)
    the letter token ids, ``-1`` where an example has fewer options (its logit is ``-inf``). Only the answer positions
    go through the output head (``logits_to_keep``) where the model takes it; prompt learning prepends virtual tokens,
    whose logits are dropped. Differentiable; float32 or wider.
    """
    device = model_device(model)
    input_ids, attention_mask, choice_ids = input_ids.to(device), attention_mask.to(device), choice_ids.to(device)
    last = attention_mask.sum(1) - 1  # (B,)
    kwargs, column = _keep_positions(model, last)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    if kwargs:
        picked = logits[torch.arange(len(last), device=device), column]  # (B, V)
    else:
        picked = logits[:, -input_ids.shape[1] :][torch.arange(len(last), device=device), last]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    out = picked.gather(1, choice_ids.clamp_min(0))
    return out.masked_fill(choice_ids < 0, float("-inf"))


def letter_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the K-way cross-entropy of the gold letters: BLoB's per-example NLL."""
    return torch.nn.functional.cross_entropy(logits, labels.to(logits.device))


def _keep_positions(model, positions: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """(forward kwargs, the column of each entry of ``positions`` in the kept logits): only the distinct
    ``positions`` go through the output head (``logits_to_keep``) where the model takes it; ``({}, None)`` for
    prompt learning (virtual tokens shift the positions) and models without the argument."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False) or not takes_logits_to_keep(model):
        return {}, None
    kept, column = torch.unique(positions, return_inverse=True)
    return {"logits_to_keep": kept}, column


def takes_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
