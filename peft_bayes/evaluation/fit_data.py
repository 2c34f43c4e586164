"""The data a posterior is fitted on, built as evaluation builds its test data: the differentiable batches of a fit
file (multiple-choice options scored as evaluation scores them, or the response tokens of each record) and the
option scorer of a validation file. The scripts hand these to the posteriors (``Workflow.batches`` /
``Workflow.scorer``), which do not import this layer."""

from __future__ import annotations

import os

import torch

from peft_bayes.data import load_records, tokenize_record
from peft_bayes.errors import InputError
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.models import pad_token_id
from peft_bayes.posterior import LMBatch
from peft_bayes.posterior.likelihood import IGNORE


def fit_batches(path: str, limit, likelihood: str, model, tokenizer, prompter, args, batch_size: int):
    """The fit (or validation) batches of ``path`` for ``likelihood``: multiple-choice examples scored as
    evaluate.py scores them (``--choice_format``, ``--choice_norm``), or the response tokens of each record."""
    if likelihood == "choice":
        data = _choice_set(path, limit, prompter, args)
        if data.task.kind != "choice":
            raise InputError(f"{path}: the choice likelihood needs multiple-choice data; use --laplace_likelihood lm")
        norm = getattr(args, "choice_norm", "none")
        return PairScorer(model, tokenizer, data.pairs, batch_size, "full", norm, data.golds).batches()
    return lm_batches(path, limit, tokenizer, prompter, batch_size, getattr(args, "cutoff_len", 256))


def choice_scorer(path: str, limit, model, tokenizer, prompter, args) -> PairScorer:
    """The option scorer of a multiple-choice validation file, scored exactly as the test set is."""
    data = _choice_set(path, limit, prompter, args)
    if data.task.kind != "choice":
        raise InputError(f"{path}: temperature scaling needs multiple-choice validation data")
    return PairScorer(model, tokenizer, data.pairs, args.batch_size, args.choice_scoring, args.choice_norm, data.golds)


def _choice_set(path: str, limit, prompter, args):
    name = os.path.splitext(os.path.basename(path))[0]
    fmt, prefix = getattr(args, "choice_format", "label"), getattr(args, "choice_prefix", None)
    return load_eval_set(name, path, limit, prompter, fmt, *([prefix] if prefix is not None else []))


def lm_batches(path: str, limit, tokenizer, prompter, batch_size: int, cutoff_len: int) -> list[LMBatch]:
    """Right-padded LMBatches of the records' responses (prompt tokens masked out of the labels)."""
    records = load_records(path, split="train")[:limit]
    rows = [tokenize_record(r, tokenizer, prompter, cutoff_len, False) for r in records]
    pad = pad_token_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[i, :n], mask[i, :n], labels[i, :n] = (
                torch.tensor(r[k]) for k in ("input_ids", "attention_mask", "labels")
            )
        batches.append(LMBatch(ids, mask, labels))
    return batches
