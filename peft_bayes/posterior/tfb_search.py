"""TFB's search for sigma: the anchor set's NLL under the posterior and the three ways to find the sigma it allows.

The anchors are multiple-choice examples (an ``OptionScorer``, scored on the evaluation's fast path, or differentiable
``ChoiceBatch`` es) or response tokens (``LMBatch`` es); a *unit* is a labelled example or a scored token. With the
model's weights at some sigma, ``samples`` fixed posterior draws give each unit ``samples`` log-likelihoods; the
anchor NLL per unit is

- ``expected`` (this library's default, the TFB paper's): the mean over draws of each draw's NLL;
- ``predictive`` (BLoB's and BayesAdapt's code): the NLL of the mean of the draws' probabilities.

Labels are the gold ones, or ``pseudo``: the mean model's own predictions (BLoB's code; multiple choice only). The
draws are the same at every sigma (common random numbers), so NLL(sigma) is a deterministic, smooth function.

Searches, each keeping "lo passes, hi fails":

- ``bisection``: on ``log sigma`` until ``hi / lo <= 1 + tolerance``, returning ``lo`` (2 + ceil(log2(log(hi/lo) /
  log(1 + tolerance))) evaluations: 12 on [1e-6, 1] at 2 %);
- ``interpolation`` (default): the same bracket, reached in fewer evaluations. The excess NLL over the mean's grows
  like a power of sigma (sigma with few fixed draws, whose first-order terms do not cancel; sigma^2 with many), so
  each step fits ``log(NLL - NLL_mean)`` linearly in ``log sigma`` through the two evaluated points that straddle
  the target (else the two nearest it; from a single point, exponent 1 down from above the target and 2 up from
  below) and evaluates half a tolerance past the estimate, on the side whose end is farther, so that two good
  estimates close the bracket. A bracket within twice the tolerance is closed by one evaluation at its middle; a
  step without a model (no positive excess yet), or a bracket that has not halved its log width in three
  evaluations, is a bisection step; the lower bound itself is evaluated only when the bracket still ends there.
  On the real model's curve (bench/bench_tfb_search.py): 5 evaluations where bisection takes 12;
- ``halving`` (BLoB's code): ``halvings`` linear halvings of ``[lo, hi]``, returning the last sigma that violated the
  threshold (the upper bound when none did).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from peft_bayes.errors import InputError
from peft_bayes.posterior.base import Progress, sample_seed
from peft_bayes.posterior.likelihood import IGNORE, ChoiceBatch, LMBatch, choice_scores, lm_logits
from peft_bayes.tuners.bayeslora import posterior_sample

Search = tuple[float, float, float | None, float | None, int]  # sigma, its NLL, failing sigma, its NLL, evaluations


class Anchors:
    """The anchor set: per-unit log-likelihoods of its labels under a model's current weights.

    Args:
        source: An ``OptionScorer`` with gold ``labels`` (scored on its fast path, no gradients; ``for_model`` gives
            the same examples on the converted model), or a list of ``ChoiceBatch`` / ``LMBatch``.
        progress: ``progress(done, total)`` in passes over the anchor set.
    """

    def __init__(self, source, progress: Progress | None = None) -> None:
        self.scorer = source if hasattr(source, "scores") else None
        self.batches = None if self.scorer is not None else list(source)
        self.progress, self.done, self.total = progress, 0, 1
        if self.scorer is not None:
            labels = torch.as_tensor(list(self.scorer.labels or []), dtype=torch.long)
            self.unit, self.gold = "example", labels
        else:
            self.unit, self.gold = _batch_kind(self.batches)
        self.count = int((self.gold >= 0).sum()) if self.unit == "example" else self.gold
        if self.count == 0:
            raise InputError(f"the TFB anchor set has no labelled {self.unit}: nothing to measure the NLL on")

    @property
    def choice(self) -> bool:
        return self.unit == "example"

    def pass_done(self) -> None:
        self.done += 1
        self.total = max(self.total, self.done)  # a search longer than announced (interpolation's worst case)
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self) -> None:
        """Reports the search as complete when it took fewer passes than announced."""
        if self.progress is not None and self.done < self.total:
            self.progress(self.total, self.total)

    @torch.no_grad()
    def scores(self, model) -> list[torch.Tensor]:
        """Multiple choice: one (K,) float64 option-score tensor per example, in order."""
        if self.scorer is not None:
            out = self.scorer.for_model(model).scores()
        else:
            out = [None] * len(self.gold)
            for batch in self.batches:  # batches may come sorted by length: back to the examples' order
                s = choice_scores(model, batch).to(torch.float64).cpu()
                for i, row in zip(batch.index.tolist(), s):
                    out[i] = row[~torch.isneginf(row)]  # -inf: an option the example lacks
        self.pass_done()
        return out

    def predictions(self, model) -> torch.Tensor:
        """The model's own answer to every example (``pseudo`` labels)."""
        if not self.choice:
            raise InputError("TFB pseudo-labels need multiple-choice anchors (the model's own answers)")
        return torch.tensor([int(s.argmax()) for s in self.scores(model)], dtype=torch.long)

    @torch.no_grad()
    def logps(self, model, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(units,) float64 log-likelihood of every labelled unit (``labels``: per example, default gold)."""
        if self.choice:
            labels = self.gold if labels is None else labels
            known = labels >= 0
            scores = self.scores(model)
            rows = [s.log_softmax(-1)[y] for s, y, k in zip(scores, labels.tolist(), known.tolist()) if k]
            return torch.stack(rows).to(torch.float64)
        out = [_token_logps(model, batch) for batch in self.batches]
        self.pass_done()
        return torch.cat(out)


def _batch_kind(batches: list) -> tuple[str, torch.Tensor | int]:
    """("example", gold labels) of ChoiceBatches, ("token", scored tokens) of LMBatches; InputError otherwise."""
    if not batches:
        raise InputError("TFB needs an anchor set (a slice of the training data); it is empty")
    if all(isinstance(b, ChoiceBatch) for b in batches):
        index, labels = torch.cat([b.index for b in batches]), torch.cat([b.labels for b in batches])
        if sorted(index.tolist()) != list(range(len(index))):
            raise InputError("TFB anchor batches must hold each example once (indices 0..n-1)")
        return "example", torch.empty_like(labels).index_put_((index,), labels)
    if all(isinstance(b, LMBatch) for b in batches):
        return "token", sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
    kinds = sorted({type(b).__name__ for b in batches})
    raise InputError(f"TFB anchor batches must all be ChoiceBatch or all LMBatch, got {', '.join(kinds)}")


def _token_logps(model, batch: LMBatch) -> torch.Tensor:
    logits = lm_logits(model, batch)[:, :-1]
    labels = batch.labels.to(logits.device)[:, 1:]
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    scored = labels != IGNORE
    return logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[scored].to(torch.float64).cpu()


def anchor_nll(
    model, anchors: Anchors, labels: torch.Tensor | None, samples: int, seed: int, predictive: bool
) -> float:
    """The anchor NLL per unit of ``samples`` fixed posterior draws (``sample_seed(seed, k)``): expected (the mean of
    the draws' NLLs) or ``predictive`` (the NLL of the draws' mean probability)."""
    draws = []
    for index in range(samples):
        with posterior_sample(model, sample_seed(seed, index)):
            draws.append(anchors.logps(model, labels))
    logp = torch.stack(draws)  # (samples, units)
    if predictive:
        per_unit = torch.logsumexp(logp, 0) - math.log(samples)
        return float(-per_unit.sum() / anchors.count)
    return float(-logp.sum() / (samples * anchors.count))


# --- the searches ----------------------------------------------------------------------------------------------------
def bisection_steps(bounds: tuple[float, float], tolerance: float) -> int:
    """Halvings of ``log(hi / lo)`` until the bracket ratio is at most ``1 + tolerance``."""
    lo, hi = bounds
    ratio = math.log(hi / lo) / math.log1p(tolerance)
    return max(0, math.ceil(math.log2(ratio))) if ratio > 1 else 0


def _ends(nll_at: Callable[[float], float], threshold: float, bounds: tuple[float, float]):
    """(lo, NLL(lo), hi, NLL(hi)) of a bracket that needs searching, or the upper bound's Search when it passes."""
    lo, hi = bounds
    nll_hi = nll_at(hi)
    if nll_hi <= threshold:
        return hi, nll_hi, None, None, 1
    nll_lo = nll_at(lo) if lo < hi else nll_hi
    _check_lower(lo, nll_lo, threshold)
    return lo, nll_lo, hi, nll_hi


def _check_lower(lo: float, nll_lo: float, threshold: float) -> None:
    if not nll_lo <= threshold:
        raise InputError(
            f"sigma_bounds: even sigma={lo:g} gives anchor NLL {nll_lo:.6g} > threshold {threshold:.6g}; "
            "lower the lower bound or raise epsilon"
        )


def search_sigma(
    nll_at: Callable[[float], float], threshold: float, bounds: tuple[float, float], tolerance: float
) -> Search:
    """The largest sigma in ``bounds`` found with ``nll_at(sigma) <= threshold``, by bisection on ``log sigma``.

    Returns:
        (sigma, its NLL, the smallest failing sigma tried or None, its NLL or None, evaluations). ``sigma`` is the
        upper bound when that passes; InputError when even the lower bound fails. NaN counts as failing.
    """
    ends = _ends(nll_at, threshold, bounds)
    if len(ends) == 5:
        return ends
    lo, nll_lo, hi, nll_hi = ends
    steps = bisection_steps(bounds, tolerance)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        value = nll_at(mid)
        if value <= threshold:
            lo, nll_lo = mid, value
        else:
            hi, nll_hi = mid, value
    return lo, nll_lo, hi, nll_hi, 2 + steps


def _estimate(points: list[tuple[float, float]], target: float) -> float | None:
    """log sigma where the excess NLL reaches ``target``, from the evaluated ``(sigma, excess)`` points with a
    positive, finite excess: a power law through the two that straddle the target (else the two nearest it),
    exponent clamped to [0.5, 4]; from a single point, exponent 1 down from one above the target (a long step towards
    a pass) and 2 up from one below (a short step); None without any."""
    usable = [(math.log(s), math.log(e)) for s, e in points if math.isfinite(e) and e > 0]
    t = math.log(target)
    below = max((p for p in usable if p[1] <= t), default=None, key=lambda p: p[1])
    above = min((p for p in usable if p[1] > t), default=None, key=lambda p: p[1])
    pair = [p for p in (below, above) if p is not None]
    if len(pair) < 2:
        pair = sorted(usable, key=lambda p: abs(p[1] - t))[:2]
    if len(pair) == 2 and pair[0][0] != pair[1][0]:
        (u1, e1), (u2, e2) = pair
        slope = min(max((e2 - e1) / (u2 - u1), 0.5), 4.0)
        return u1 + (t - e1) / slope
    if pair:
        u, e = pair[0]
        return u + (t - e) / (1.0 if e > t else 2.0)
    return None


def interpolation_search(
    nll_at: Callable[[float], float], threshold: float, bounds: tuple[float, float], tolerance: float, base: float
) -> Search:
    """:func:`search_sigma`'s answer (the same bracket rule) in fewer evaluations (see the module docstring);
    ``base`` is the mean model's NLL. The lower bound is evaluated only if the bracket's lower end is still there at
    the end. Never more evaluations than twice the bisection's."""
    lo, hi = bounds
    v_hi = nll_at(hi)
    if v_hi <= threshold:
        return hi, v_hi, None, None, 1
    if lo >= hi:
        _check_lower(lo, v_hi, threshold)  # raises: the one sigma allowed fails
    v_lo, lo_known, points = base, False, [(hi, v_hi - base)]
    target, close, n = threshold - base, math.log1p(tolerance), 1
    widths = [math.log(hi / lo)]  # the bracket's log width after each evaluation
    limit = 2 * (2 + bisection_steps(bounds, tolerance))
    while math.log(hi / lo) > close and n < limit:
        u_lo, u_hi = math.log(lo), math.log(hi)
        stalled = len(widths) >= 4 and widths[-1] > 0.5 * widths[-4]
        informative = math.isfinite(points[-1][1]) and points[-1][1] > 0  # the last evaluation fed the model
        u = _estimate(points, target) if target > 0 and not stalled and informative else None
        if math.log(hi / lo) <= 2 * close or u is None:  # closes the bracket in one step / no model: bisect
            u = 0.5 * (u_lo + u_hi)
        else:
            u += 0.499 * close if u - u_lo <= u_hi - u else -0.499 * close  # past the estimate, towards the far end
            margin = 0.01 * (u_hi - u_lo)
            u = min(max(u, u_lo + margin), u_hi - margin)
        sigma = math.exp(u)
        value, n = nll_at(sigma), n + 1
        points.append((sigma, value - base))
        if value <= threshold:
            lo, v_lo, lo_known = sigma, value, True
        else:
            hi, v_hi = sigma, value
        widths.append(math.log(hi / lo))
    if not lo_known:  # the lower bound itself: it must pass
        v_lo, n = nll_at(lo), n + 1
        _check_lower(lo, v_lo, threshold)
    return lo, v_lo, hi, v_hi, n


def halving_search(
    violates: Callable[[float], bool], nll_at: Callable[[float], float], bounds: tuple[float, float], halvings: int
) -> Search:
    """BLoB's search: ``halvings`` linear halvings of ``bounds``; sigma is the last midpoint that violated the
    threshold (it is also the smallest failing sigma tried), or the upper bound when none did (not evaluated then:
    its NLL is NaN)."""
    lo, hi = bounds
    best, best_nll, violated = hi, math.nan, False
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        value = nll_at(mid)
        if violates(value):
            best, best_nll, hi, violated = mid, value, mid, True
        else:
            lo = mid
    return (best, best_nll, best, best_nll, halvings) if violated else (hi, math.nan, None, None, halvings)


def search_evaluations(search: str, bounds: Sequence[float], tolerance: float, halvings: int) -> int:
    """The sigma evaluations announced for a search's progress: halving's and bisection's exact count, which also
    bounds interpolation's in all but rare cases (it stops at twice that)."""
    if search == "halving":
        return halvings
    return 2 + bisection_steps(tuple(bounds), tolerance)
