"""Multiple-choice scoring by option likelihood: log p(option continuation | context), no generation.

Every option of an example is a pair ``(context, continuation)`` of texts; only the continuation's tokens are
scored. Two formats build the pairs (``peft_bayes.data.choices``):

- ``label``: ``context = prompt + prefix.rstrip()`` and ``continuation = " " + label`` (no space when the prefix is
  empty or does not end in whitespace). LLM-Adapters trains on outputs such as ``"the correct answer is answer2"``,
  so the default prefix is ``"the correct answer is "``.
- ``cloze``: ``context = prompt`` and ``continuation = the option's text`` (fill-in-the-blank: the sentence up to
  the blank filled with the option is context, the rest of the sentence is scored).

Three paths compute the same scores (``--choice_scoring``):

- ``full`` (the reference): every option is its own full sequence ``context + continuation``; all options of
  ``batch_size`` examples go through ONE right-padded forward pass.
- ``shared`` (default): the tokens all options of an example share (prompt, prefix, the common start of the
  continuations) run once. Where the model takes ``position_ids`` and a 4D attention mask (``packed_scoring``:
  LLaMA, GPT-2, OPT, GPT-J, GPT-NeoX) each example is ONE packed row, the shared prefix followed by every option's
  own tokens, each option masked from the others and at the positions of its own sequence: one forward pass per
  batch (after a one-row pass for the tokens all its examples start with, such as a system prompt). Elsewhere
  (BLOOM's ALiBi) it takes the ``cached`` path.
- ``cached``: the shared tokens of ``batch_size`` examples in one right-padded pass; an option whose remainder is one
  token is scored from the last shared position's logits (labels), longer remainders (cloze) continue from the
  shared KV cache, the options of all examples batched in a second pass.

Prompt-learning adapters (prefix, prompt, p-tuning) manage the cache and positions themselves and always take the
full path.

Scores are summed log-probabilities, or normalised (``norm``) per continuation token or per character, as
lm-evaluation-harness' ``acc`` / ``acc_norm`` do; option probabilities are the softmax of the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from peft_bayes.data.answers import TaskSpec
from peft_bayes.data.choices import LETTER_PREFIX, ChoiceFormat, ChoiceQuestion, gold_index, letter_labels
from peft_bayes.data.choices import example_options as _record_options
from peft_bayes.data.loading import split_continuation
from peft_bayes.errors import InputError
from peft_bayes.evaluation.batching import make_batches
from peft_bayes.evaluation.packed_scoring import (
    accepts_argument,
    packed_length,
    packed_log_likelihoods,
    packing_is_exact,
    shared_length,
)
from peft_bayes.models import model_device, pad_token_id
from peft_bayes.options import OptionEnum, coerce_enums, option

DEFAULT_PREFIX = "the correct answer is "


class ScoringPath(OptionEnum):
    """How the options' log-likelihoods are computed (the same numbers each way, see the module docstring)."""

    SHARED = "shared"
    CACHED = "cached"
    FULL = "full"


class ChoiceNorm(OptionEnum):
    """An option's score: the summed log-likelihood, or per token / per character of the option (acc_norm)."""

    NONE = "none"
    TOKENS = "tokens"
    CHARS = "chars"


SCORING_PATHS, CHOICE_NORMS = ScoringPath.values(), ChoiceNorm.values()


@dataclass
class ChoiceOptions:
    """How evaluation scores a multiple-choice set (evaluate.py's ``--choice_*`` flags)."""

    format: ChoiceFormat | None = option(
        None,
        "multiple choice: label = score the option label after --choice_prefix (LLM-Adapters); cloze = score each "
        "option's text as the response to the question alone (small models; lm-evaluation-harness); letter = the "
        "lettered question, the K-way softmax over the letter tokens at 'Answer:' (BLoB, Laplace-LoRA, SWAG-LoRA)",
        flag="choice_format",
        default_text="cloze or letter where the adapter's train_args.json records it, else label",
    )
    prefix: str = option(
        DEFAULT_PREFIX,
        f"response text before the scored option label ('' scores the bare label) (default: {DEFAULT_PREFIX!r})",
        flag="choice_prefix",
    )
    norm: ChoiceNorm = option(ChoiceNorm.NONE, ChoiceNorm.__doc__, flag="choice_norm")
    scoring: ScoringPath = option(
        ScoringPath.SHARED,
        "shared = the shared prompt once: one packed row per example where the model allows (LLaMA, GPT-2, OPT, "
        "GPT-J, GPT-NeoX), else from its KV cache; cached = the prompt once, the options from its KV cache; full = "
        "every option as its own sequence (the reference path)",
        flag="choice_scoring",
    )

    def __post_init__(self) -> None:
        coerce_enums(self)


Pair = tuple[str, str]  # (context text, continuation text) of one option


def example_options(record: dict, task: TaskSpec) -> tuple[str, ...]:
    """The options of one example: the labels of its own ``Answer format:`` line (ARC has 3-5), else the task's."""
    return _record_options(record, task.labels)


def gold_indices(records: Sequence[dict], options: Sequence[Sequence[str]], source: str) -> list[int]:
    """Index of each record's gold answer among its options (case-insensitive).

    Raises:
        InputError: a gold answer is not one of its record's options.
    """
    return [gold_index(rec, opts, f"{source}: record {i}") for i, (rec, opts) in enumerate(zip(records, options))]


def label_pairs(prompt: str, labels: Sequence[str], prefix: str = DEFAULT_PREFIX) -> list[Pair]:
    """The label format: context = prompt + prefix (trailing space dropped), continuation = [space +] label."""
    space = " " if prefix[-1:].isspace() else ""
    return [(prompt + prefix.rstrip(), space + label) for label in labels]


def letter_pairs(prompt: str, n_options: int, where: str = "record") -> list[Pair]:
    """The letter format: context = prompt + ``"Answer:"``, continuation = ``" A"``, ``" B"``, ...: one token each, so
    the option scores are the letter tokens' log-probabilities at one position and their softmax is the K-way
    softmax over the letters' logits (``prompt`` holds the lettered question: ``letter_instruction``)."""
    return label_pairs(prompt, letter_labels(n_options, where), LETTER_PREFIX)


def cloze_pairs(prompt: str, question: ChoiceQuestion) -> list[Pair]:
    """The cloze format: each option's text (or the rest of a filled-in sentence) as the response to the prompt."""
    pairs = []
    for k in range(len(question.texts)):
        context, continuation = question.cloze_pair(k)
        pairs.append((prompt + context, continuation))
    return pairs


def encode_pairs(tokenizer, pairs: Sequence[Pair]) -> list[tuple[list[int], int]]:
    """One ``(token ids, number of continuation tokens)`` per option: the ids are context + continuation."""
    seqs = []
    for context, continuation in pairs:
        ctx, cont = split_continuation(tokenizer, context, continuation)
        if not ctx or not cont:
            raise InputError(f"option {continuation.strip()!r}: empty context or continuation after tokenization")
        seqs.append((ctx + cont, len(cont)))
    return seqs


def option_sequences(tokenizer, prompt: str, options: Sequence[str], prefix: str) -> list[tuple[list[int], int]]:
    """The label format's ``(token ids, number of continuation tokens)`` per option."""
    return encode_pairs(tokenizer, label_pairs(prompt, options, prefix))


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(rows), max length) long, real tokens first."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def sequence_log_likelihoods(model, seqs: Sequence[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """The full path: sum of the continuation tokens' log-probabilities of each sequence, one right-padded pass.

    Returns:
        (len(seqs),) float64.
    """
    input_ids, mask = _right_padded([ids for ids, _ in seqs], pad_id)
    device = model_device(model)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    logits = logits[:, -input_ids.shape[1] :]  # (B, L, V); prompt tuning / p-tuning prepend virtual tokens
    out = torch.empty(len(seqs), dtype=torch.float64)
    for r, (ids, n_cont) in enumerate(seqs):
        start = len(ids) - n_cont  # first continuation token; position start-1 predicts it
        rows = logits[r, start - 1 : len(ids) - 1].double().log_softmax(-1)  # (n_cont, V)
        targets = torch.tensor(ids[start:], device=rows.device)
        out[r] = rows.gather(1, targets[:, None]).sum().item()
    return out


def _prefix_logits(model, ids: torch.Tensor, mask: torch.Tensor, first: list[int], last: list[int]):
    """Pass 1: (output, column) where ``output.logits[e, column(e, p)]`` are example e's logits at position p.

    Only positions ``first[e]..last[e]`` are needed (usually just the last shared one): with ``logits_to_keep`` the
    vocabulary projection runs on those alone, (E, K, V) instead of (E, P, V).
    """
    device = model_device(model)
    kwargs = {}
    if accepts_argument(model, "logits_to_keep"):
        k = max(b - a + 1 for a, b in zip(first, last))
        keep = torch.tensor([[min(a + j, b) for j in range(k)] for a, b in zip(first, last)])  # (E, K)
        kwargs["logits_to_keep"] = keep.to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **kwargs)
    if kwargs:
        return out, lambda e, p: p - first[e]
    return out, lambda e, p: p


def _log_prob(logits_row: torch.Tensor, token: int) -> float:
    return float(logits_row.double().log_softmax(-1)[token])


@dataclass
class _Option:
    """One option inside a shared batch: its example's row, its ids, where scoring starts, the shared length."""

    example: int
    ids: list[int]
    start: int  # first scored token
    shared: int  # tokens run in the shared pass


def shared_log_likelihoods(model, examples: Sequence[Sequence[tuple[list[int], int]]], pad_id: int) -> list:
    """The cached path for a batch of examples; the same scores as :func:`sequence_log_likelihoods`.

    Pass 1 runs each example's shared tokens (right-padded, (E, P)); an option's first own token is scored from
    the logits at its example's last shared position. Pass 2 feeds every option's remaining tokens but the last,
    (R, T), over the shared KV cache gathered per option: the mask keeps the padding holes of pass 1 masked and the
    position ids continue each example's own count, so every token sees exactly what it sees in the full path.

    Returns:
        One (number of options,) float64 tensor per example.
    """
    shared = [shared_length(seqs) for seqs in examples]
    prefix_ids, prefix_mask = _right_padded([seqs[0][0][:p] for seqs, p in zip(examples, shared)], pad_id)
    options = [
        _Option(e, ids, len(ids) - n_cont, shared[e]) for e, seqs in enumerate(examples) for ids, n_cont in seqs
    ]
    scores = torch.zeros(len(options), dtype=torch.float64)
    # Positions whose logits pass 1 must give: from the first scored token's predecessor to the last shared token
    # (at least that one; a fill-in-the-blank question scores nothing inside the shared part).
    first = [min([opt.start - 1 for opt in options if opt.example == e] + [p - 1]) for e, p in enumerate(shared)]
    with torch.inference_mode():
        out, column = _prefix_logits(model, prefix_ids, prefix_mask, first, [p - 1 for p in shared])
        for r, opt in enumerate(options):  # scored tokens at positions start..shared: predicted inside pass 1
            for t in range(opt.start, opt.shared + 1):
                scores[r] += _log_prob(out.logits[opt.example, column(opt.example, t - 1)], opt.ids[t])
        tails = [r for r, opt in enumerate(options) if len(opt.ids) - 1 > opt.shared]
        if tails:
            scores += _continue_from_cache(model, options, tails, out.past_key_values, prefix_mask, pad_id)
    sizes = [len(seqs) for seqs in examples]
    return list(scores.split(sizes))


# Per-forward cost in token units of pass 2's grouping: a few dozen tokens' worth of per-layer kernel launches.
_GROUP_OVERHEAD_TOKENS = 24


def length_groups(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Splits rows into groups of similar length, minimising sum(group size * group's longest + overhead).

    Right-padding every option's remainder to the longest of the batch can cost more than the remainders themselves
    (ARC: a 20-token option beside 2-token ones); groups of consecutive lengths (sorted) are chosen by dynamic
    programming. Returns row indices, longest first.
    """
    overhead = _GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[k]: cost of the first k rows (sorted)
    cut = [0] * (len(order) + 1)
    for k in range(1, len(order) + 1):
        for j in range(k):  # rows j..k-1 form the last group; the longest is row j
            cost = best[j] + (k - j) * lengths[order[j]] + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups, k = [], len(order)
    while k > 0:
        groups.append(order[cut[k] : k])
        k = cut[k]
    return groups[::-1]


def _continue_from_cache(model, options: list[_Option], tails: list[int], cache, prefix_mask, pad_id: int):
    """Pass 2 of the cached path: log-probabilities of the tokens after each option's first own token.

    Options are fed in groups of similar remainder length (:func:`length_groups`), each over its own copy of the
    pass-1 cache with one row per option.
    """
    import copy

    feed = [options[r].ids[options[r].shared : -1] for r in tails]  # the last token is only predicted
    scores = torch.zeros(len(options), dtype=torch.float64)
    for group in length_groups([len(f) for f in feed]):
        rows = [tails[g] for g in group]
        logits = _cached_forward(
            model, options, rows, [feed[g] for g in group], copy.deepcopy(cache), prefix_mask, pad_id
        )
        for j, r in enumerate(rows):
            opt = options[r]
            first = max(opt.start, opt.shared + 1)
            logp = logits[j, first - 1 - opt.shared : len(opt.ids) - 1 - opt.shared].double().log_softmax(-1)
            scores[r] += logp.gather(1, torch.tensor(opt.ids[first:], device=logp.device)[:, None]).sum().item()
    return scores


def _cached_forward(model, options, rows: list[int], feed, cache, prefix_mask, pad_id: int) -> torch.Tensor:
    """Logits (R, T, V) of ``feed`` (one right-padded row per option) continuing its example's cached prefix."""
    device = model_device(model)
    ids, mask = _right_padded(feed, pad_id)
    examples = torch.tensor([options[r].example for r in rows])
    cache.reorder_cache(examples.to(device))  # one copy of its example's cache per option (index_select)
    attention = torch.cat([prefix_mask[examples], mask], dim=1)  # keeps pass 1's padding holes masked
    kwargs = {}
    if accepts_argument(model, "position_ids"):  # BLOOM has none: ALiBi positions come from the mask's cumulative sum
        start = torch.tensor([options[r].shared for r in rows])
        kwargs["position_ids"] = (start[:, None] + torch.arange(ids.shape[1])).to(device)
    return model(
        input_ids=ids.to(device), attention_mask=attention.to(device), past_key_values=cache, use_cache=True, **kwargs
    ).logits


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def normalisers(pairs: Sequence[Pair], seqs: Sequence[tuple[list[int], int]], norm: str) -> torch.Tensor:
    if norm == "tokens":
        return torch.tensor([float(n) for _, n in seqs], dtype=torch.float64)
    if norm == "chars":
        return torch.tensor([float(max(len(cont), 1)) for _, cont in pairs], dtype=torch.float64)
    return torch.ones(len(pairs), dtype=torch.float64)


def score_pairs(
    model,
    tokenizer,
    pairs: Sequence[Sequence[Pair]],
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    scoring: str = "shared",
    norm: str = "none",
    encoded: Sequence[Sequence[tuple[list[int], int]]] | None = None,
) -> list[torch.Tensor]:
    """Scores of every option of every example; ``batch_size`` examples per forward pass.

    Args:
        pairs: Per example, one ``(context, continuation)`` text pair per option (:func:`label_pairs`,
            :func:`cloze_pairs`).
        scoring: ``shared`` (the shared tokens once: packed rows where the model allows, else ``cached``),
            ``cached`` (the shared tokens once, then the options from the KV cache) or ``full`` (every option as
            its own sequence, the reference); prompt-learning adapters always take ``full``.
        norm: ``none`` (summed log-likelihood), ``tokens`` (per continuation token) or ``chars`` (per character).
        encoded: ``[encode_pairs(tokenizer, p) for p in pairs]`` when the caller scores the same pairs repeatedly
            (one pass per posterior sample): tokenized once.

    Returns:
        One (len(pairs[i]),) float64 tensor per example, in input order.
    """
    ChoiceOptions(norm=norm, scoring=scoring)  # one-line errors for unknown values
    seqs = encoded if encoded is not None else [encode_pairs(tokenizer, p) for p in pairs]
    pad_id = pad_token_id(tokenizer)
    path = batch_path(model, scoring)
    row_length = packed_length if path == "packed" else (lambda s: max(len(ids) for ids, _ in s))
    scores: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    done = 0
    for idx in make_batches([row_length(s) for s in seqs], batch_size):
        for i, ll in zip(idx, _score_batch(model, [seqs[i] for i in idx], pad_id, path)):
            scores[i] = ll / normalisers(pairs[i], seqs[i], norm)
        done += len(idx)
        if progress:
            progress(done, len(pairs))
    return scores


def batch_path(model, scoring: str) -> str:
    """``full``, ``packed`` or ``cached``: how :func:`score_pairs` runs its batches on ``model`` (the first call on a
    base model runs the packing probe: make it outside any posterior sample, whose noise would fail the probe)."""
    if scoring == "full" or _is_prompt_learning(model):
        return "full"
    if scoring == "shared" and packing_is_exact(model):
        return "packed"
    return "cached"


def _score_batch(model, batch: Sequence[Sequence[tuple[list[int], int]]], pad_id: int, path: str) -> list:
    """Summed log-likelihoods of every option of a batch of examples, one (number of options,) tensor each."""
    if path == "packed":
        return packed_log_likelihoods(model, batch, pad_id)
    if path == "cached" and all(shared_length(s) > 0 for s in batch):
        return shared_log_likelihoods(model, batch, pad_id)
    flat = sequence_log_likelihoods(model, [seq for s in batch for seq in s], pad_id)
    return list(flat.split([len(s) for s in batch]))


def score_options(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    prefix: str = DEFAULT_PREFIX,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    scoring: str = "shared",
) -> list[torch.Tensor]:
    """Label-format log-likelihood of every option label of every example (see :func:`score_pairs`).

    Returns:
        One (len(options[i]),) float64 tensor per example, in input order.
    """
    pairs = [label_pairs(p, opts, prefix) for p, opts in zip(prompts, options)]
    return score_pairs(model, tokenizer, pairs, batch_size, progress, scoring)


def option_probabilities(log_likelihoods: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax over each example's options."""
    return [ll.softmax(-1) for ll in log_likelihoods]
