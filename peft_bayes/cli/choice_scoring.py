"""Multiple-choice scoring by option likelihood: log p(option label | prompt + response prefix), no generation.

Each option becomes one sequence ``context + continuation`` where ``context = prompt + prefix.rstrip()`` and
``continuation = " " + label`` (no space when the prefix is empty or does not end in whitespace). LLM-Adapters
trains on outputs such as ``"the correct answer is answer2"``, so the default prefix is
``"the correct answer is "``. All options of a batch of examples go through ONE forward pass, right-padded with an
attention mask: real tokens keep positions 0..len-1, so batched scores equal one-at-a-time scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from peft_bayes.cli.batching import make_batches
from peft_bayes.data.answers import TaskSpec, _format_labels
from peft_bayes.errors import InputError

DEFAULT_PREFIX = "the correct answer is "


def example_options(record: dict, task: TaskSpec) -> tuple[str, ...]:
    """The options of one example: the labels of its own ``Answer format:`` line (ARC has 3-5), else the task's."""
    return _format_labels(str(record.get("instruction", ""))) or task.labels


def gold_indices(records: Sequence[dict], options: Sequence[Sequence[str]], source: str) -> list[int]:
    """Index of each record's gold answer among its options (case-insensitive).

    Raises:
        InputError: a gold answer is not one of its record's options.
    """
    golds = []
    for i, (rec, opts) in enumerate(zip(records, options)):
        lowered = [o.strip().lower() for o in opts]
        gold = str(rec["answer"]).strip().lower()
        if gold not in lowered:
            raise InputError(
                f"{source}: record {i} has answer {rec['answer']!r}, which is not one of its options {'/'.join(opts)}"
            )
        golds.append(lowered.index(gold))
    return golds


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (with the tokenizer's special tokens) and of ``continuation`` after it.

    The continuation ids are the tail of ``tokenize(context + continuation)`` when ``tokenize(context)`` is its
    prefix (the text is tokenized as the model sees it in training), else ``continuation`` tokenized on its own.
    """
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if len(full) > len(ctx) and full[: len(ctx)] == ctx:
        return ctx, full[len(ctx) :]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def option_sequences(tokenizer, prompt: str, options: Sequence[str], prefix: str) -> list[tuple[list[int], int]]:
    """One ``(token ids, number of continuation tokens)`` per option: the ids are context + continuation."""
    context = prompt + prefix.rstrip()
    space = " " if prefix[-1:].isspace() else ""
    seqs = []
    for label in options:
        ctx, cont = split_continuation(tokenizer, context, space + label)
        if not ctx or not cont:
            raise InputError(f"option {label!r}: empty context or continuation after tokenization")
        seqs.append((ctx + cont, len(cont)))
    return seqs


def sequence_log_likelihoods(model, seqs: Sequence[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Sum of the continuation tokens' log-probabilities of each sequence, in one right-padded forward pass.

    Returns:
        (len(seqs),) float64.
    """
    device = next(p.device for p in model.parameters())
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, (ids, _) in enumerate(seqs):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    logits = logits[:, -length:]  # (B, L, V); prompt tuning / p-tuning prepend virtual tokens, dropped here
    out = torch.empty(len(seqs), dtype=torch.float64)
    for r, (ids, n_cont) in enumerate(seqs):
        start = len(ids) - n_cont  # first continuation token; position start-1 predicts it
        rows = logits[r, start - 1 : len(ids) - 1].double().log_softmax(-1)  # (n_cont, V)
        targets = torch.tensor(ids[start:], device=rows.device)
        out[r] = rows.gather(1, targets[:, None]).sum().item()
    return out


def score_options(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    prefix: str = DEFAULT_PREFIX,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """Log-likelihood of every option of every example; ``batch_size`` examples (all their options) per forward.

    Returns:
        One (len(options[i]),) float64 tensor per example, in input order.
    """
    seqs = [option_sequences(tokenizer, p, opts, prefix) for p, opts in zip(prompts, options)]
    lengths = [max(len(ids) for ids, _ in s) for s in seqs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    done = 0
    for idx in make_batches(lengths, batch_size):
        flat = [seq for i in idx for seq in seqs[i]]
        logliks = sequence_log_likelihoods(model, flat, pad_id)
        for i, chunk in zip(idx, logliks.split([len(seqs[i]) for i in idx])):
            scores[i] = chunk
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return scores


def option_probabilities(log_likelihoods: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax over each example's options."""
    return [ll.softmax(-1) for ll in log_likelihoods]
