"""The packed option-scoring path: all options of an example in ONE row, a single forward pass per batch.

A row holds the tokens every option of the example shares (its prefix), then each option's own tokens back to back,
the last token of each left out (it is only predicted)::

    ids        p0 p1 p2 | a3 a4 a5 | b3 | c3 c4       (prefix, then options a, b, c)
    positions   0  1  2 |  3  4  5 |  3 |  3  4       each option restarts where the prefix ends
    segment     0  0  0 |  1  1  1 |  2 |  3  3

and a 4D additive attention mask lets a token see the prefix and the earlier tokens of its own segment only, so
with explicit ``position_ids`` every option token sees exactly what it sees as its own full sequence. One pass
replaces the cached path's prefix pass, KV-cache copies and option pass; the vocabulary projection runs only on the
positions that predict a scored token (``logits_to_keep``). The tokens every example of a batch starts with (a
template's header, a chat system prompt: 33 of ARC's ~77 tokens per packed row with SmolLM2's chat template) run
once, in a one-row pass whose KV cache, repeated per row, the packed rows continue.

Packing is exact only for models that take ``position_ids`` and apply an arbitrary 4D mask (rotary or learned
absolute positions: LLaMA, GPT-2, OPT, GPT-J, GPT-NeoX). BLOOM builds its ALiBi bias from the 2D mask and takes no
``position_ids``; :func:`packing_is_exact` decides once per model, by a static check and a small probe that compares
packed with unpacked scores, and the caller keeps the KV-cache path for the rest.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from peft_bayes.models import model_device

Encoded = Sequence[tuple[list[int], int]]  # one example: (token ids, number of continuation tokens) per option

# Attention implementations that add an arbitrary (B, 1, Q, K) mask to the scores; flash kernels take only 2D masks.
_MASKED_ATTENTION = ("eager", "sdpa")
# Largest |packed - unpacked| log-likelihood the probe accepts: float32 noise is ~1e-6; a position or mask that is
# ignored moves the probe's scores by far more. Half precision is noisier.
_PROBE_ATOL = {torch.float32: 1e-4, torch.float64: 1e-8}
_PROBE_ATOL_HALF = 5e-2
# Splitting off the tokens all rows of a batch share costs one small forward pass: worth it where it saves at least
# this many token computations (the same few dozen tokens' worth of per-layer overhead as the cached path's groups).
_COMMON_MIN_TOKENS = 24
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_argument(model, argument: str) -> bool:
    """Whether the (base) model's forward takes ``argument`` (``position_ids``, ``logits_to_keep``)."""
    return argument in inspect.signature(_base(model).forward).parameters


def shared_length(seqs: Encoded) -> int:
    """Tokens every option of one example starts with, leaving each option at least one token of its own."""
    first = seqs[0][0]
    n = min(len(ids) for ids, _ in seqs) - 1
    for ids, _ in seqs[1:]:
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return n


def packed_length(seqs: Encoded) -> int:
    """Length of an example's packed row: the shared prefix plus every option's own tokens but its last."""
    p = shared_length(seqs)
    return p + sum(len(ids) - 1 - p for ids, _ in seqs)


@dataclass
class PackedRow:
    """One example's packed row and the tokens it scores.

    ``scored[i] = (column, target, option)``: the logits at ``column`` of the row predict token ``target`` of
    ``option``; an option's log-likelihood is the sum over its entries.
    """

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)  # 0: the shared prefix; k + 1: option k
    scored: list[tuple[int, int, int]] = field(default_factory=list)


def pack_example(seqs: Encoded) -> PackedRow:
    """The packed row of one example (see the module docstring)."""
    p = shared_length(seqs)
    row = PackedRow(list(seqs[0][0][:p]), list(range(p)), [0] * p)
    for k, (ids, n_cont) in enumerate(seqs):
        offset = len(row.ids)  # column of the option's first own token
        feed = ids[p:-1]
        row.ids += feed
        row.positions += range(p, p + len(feed))
        row.segments += [k + 1] * len(feed)
        for t in range(len(ids) - n_cont, len(ids)):  # token t is predicted at position t - 1 of its sequence
            column = t - 1 if t - 1 < p else offset + t - 1 - p
            row.scored.append((column, ids[t], k))
    return row


def common_prefix(rows: Sequence[PackedRow], min_tokens: int) -> tuple[list[int], list[PackedRow]]:
    """The tokens every row starts with (a template's fixed header, a system prompt) and the rows without them.

    The common part stays inside every row's prefix and before its first scored column (its logits are not kept).
    It is split off only where it saves at least ``min_tokens`` token computations: ``(rows - 1) * length``.
    """
    first = rows[0].ids
    n = min(min(r.segments.count(0), min(c for c, _, _ in r.scored)) for r in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row.ids[k] == first[k]:
            k += 1
        n = k
    if (len(rows) - 1) * n < max(min_tokens, 1):
        return [], list(rows)
    rest = [
        PackedRow(r.ids[n:], r.positions[n:], r.segments[n:], [(c - n, t, k) for c, t, k in r.scored]) for r in rows
    ]
    return first[:n], rest


def packed_attention_mask(
    segments: torch.Tensor, real: torch.Tensor, dtype: torch.dtype, cached: int = 0
) -> torch.Tensor:
    """Additive (E, 1, L, cached + L) mask: every query sees the ``cached`` common tokens, then key j <= i of the
    prefix (segment 0) or of its own segment.

    ``segments`` (E, L) long, ``real`` (E, L) bool (False on padding). Padding sees itself, so no row of the softmax
    is empty (no NaN); its outputs are never read.
    """
    n, length = segments.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])  # (E, L query, L key)
    allowed = (causal & same & real[:, None, :]) | torch.eye(length, dtype=torch.bool)
    allowed = torch.cat([torch.ones(n, length, cached, dtype=torch.bool), allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _padded(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (E, L) ids, positions, segments (-1 on padding) and the real-token mask."""
    length = max(len(r.ids) for r in rows)
    out = {
        "ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
        "positions": torch.zeros((len(rows), length), dtype=torch.long),
        "segments": torch.full((len(rows), length), -1, dtype=torch.long),
    }
    for e, row in enumerate(rows):
        n = len(row.ids)
        out["ids"][e, :n] = torch.tensor(row.ids, dtype=torch.long)
        out["positions"][e, :n] = torch.tensor(row.positions, dtype=torch.long)
        out["segments"][e, :n] = torch.tensor(row.segments, dtype=torch.long)
    out["real"] = out["segments"] >= 0
    return out


def _kept_columns(rows: Sequence[PackedRow]) -> tuple[torch.Tensor, list[dict[int, int]]]:
    """(E, K) columns whose logits are needed (short rows repeat their last one) and, per row, column -> index."""
    columns = [sorted({c for c, _, _ in row.scored}) for row in rows]
    k = max(len(c) for c in columns)
    keep = torch.tensor([c + [c[-1]] * (k - len(c)) for c in columns], dtype=torch.long)
    return keep, [{c: i for i, c in enumerate(cols)} for cols in columns]


def _common_cache(model, ids: list[int], rows: int, device: torch.device):
    """KV cache of the common tokens: one forward of one row, repeated for ``rows`` rows (None without tokens)."""
    if not ids:
        return None
    kwargs = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    cache = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kwargs).past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


def _packed_logits(model, rows: Sequence[PackedRow], common: list[int], pad_id: int):
    """(logits, index): ``logits[e, index[e][column]]`` are row e's logits at ``column``, one forward pass."""
    batch = _padded(rows, pad_id)
    device = model_device(model)
    dtype = _base(model).get_input_embeddings().weight.dtype
    kwargs = {}
    keep, index = _kept_columns(rows)
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep.to(device)  # the vocabulary projection on the scored positions only
    else:
        index = [{c: c for c in i} for i in index]
    mask = packed_attention_mask(batch["segments"], batch["real"], dtype, cached=len(common))
    cache = _common_cache(model, common, len(rows), device)
    logits = model(
        input_ids=batch["ids"].to(device),
        attention_mask=mask.to(device),
        position_ids=batch["positions"].to(device),
        past_key_values=cache,
        use_cache=cache is not None,
        **kwargs,
    ).logits  # (E, K, V), or (E, L, V) without logits_to_keep
    return logits, index


def packed_log_likelihoods(
    model, examples: Sequence[Encoded], pad_id: int, min_common: int | None = None
) -> list[torch.Tensor]:
    """Summed continuation log-likelihood of every option, one forward pass for the batch of examples.

    The same scores as the full path (every option its own sequence) on models where :func:`packing_is_exact`.
    Tokens that every example starts with run once, in a one-row pass whose KV cache the rows continue
    (:func:`common_prefix`; ``min_common`` tokens saved at least, default ``_COMMON_MIN_TOKENS``).

    Returns:
        One (number of options,) float64 tensor per example.
    """
    min_common = _COMMON_MIN_TOKENS if min_common is None else min_common
    common, rows = common_prefix([pack_example(seqs) for seqs in examples], min_common)
    with torch.inference_mode():
        logits, index = _packed_logits(model, rows, common, pad_id)
    sizes = [len(seqs) for seqs in examples]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    items = [(e, index[e][c], t, starts[e] + k) for e, row in enumerate(rows) for c, t, k in row.scored]
    e_idx, col, target, option = (torch.tensor(v, device=logits.device) for v in zip(*items))
    picked = logits[e_idx, col].double()  # (N scored tokens, V)
    logp = picked.gather(1, target[:, None])[:, 0] - picked.logsumexp(-1)
    scores = torch.zeros(sum(sizes), dtype=torch.float64).index_add_(0, option.cpu(), logp.cpu())
    return list(scores.split(sizes))


def _unpacked_log_likelihood(model, ids: list[int], n_cont: int) -> float:
    """One option as its own unpadded sequence: the reference the probe compares with."""
    device = model_device(model)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].double()
    logp = logits[-n_cont - 1 : -1].log_softmax(-1)
    return float(logp.gather(1, torch.tensor(ids[-n_cont:], device=device)[:, None]).sum())


def _probe(model) -> bool:
    """Packed scores of two small examples equal their options scored one by one. The examples share a common
    start (run once, from its KV cache); a long option comes first, so the next one's packed columns lie far from its
    positions; one option is a single, label-like token."""
    embeddings = _base(model).get_input_embeddings().weight
    t = [(7 * i + 3) % embeddings.shape[0] for i in range(32)]
    examples = [
        [(t[:5] + t[5:14], 6), (t[:5] + t[14:16], 2), (t[:5] + t[16:17], 1)],
        [(t[:3] + t[20:22] + t[22:25], 3), (t[:3] + t[20:22] + t[25:26], 1)],
    ]
    packed = torch.cat(packed_log_likelihoods(model, examples, pad_id=0, min_common=0))
    unpacked = [_unpacked_log_likelihood(model, ids, n) for example in examples for ids, n in example]
    atol = _PROBE_ATOL.get(embeddings.dtype, _PROBE_ATOL_HALF)
    return bool((packed - torch.tensor(unpacked, dtype=torch.float64)).abs().max() <= atol)


def packing_is_exact(model) -> bool:
    """Whether :func:`packed_log_likelihoods` gives the full path's scores on ``model``; decided once per model.

    The model must take ``position_ids`` and an arbitrary 4D mask (eager or SDPA attention), and a probe example
    scored packed must equal its options scored one by one (it catches positions built from the 2D mask, such as
    ALiBi, and a mask or positions that are silently ignored).
    """
    base = _base(model)
    if base not in _probed:
        attention = getattr(base.config, "_attn_implementation", "eager")
        static = attention in _MASKED_ATTENTION and accepts_argument(model, "position_ids")
        _probed[base] = static and _probe(model)
    return _probed[base]
