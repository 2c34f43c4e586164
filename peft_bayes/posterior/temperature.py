"""Temperature scaling (Guo et al. 2017): one temperature T on the option scores, fitted on validation data.

The cheap calibration baseline: the adapter's weights stay as they are (one deterministic pass) and the predictive
is ``softmax(scores / T)``, with T minimising the mean negative log-likelihood of the gold options of a validation
set (LBFGS on log T, so T stays positive). T > 1 softens an overconfident model, T < 1 sharpens an underconfident
one; the argmax, hence the accuracy, never changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from peft_bayes.errors import InputError
from peft_bayes.posterior.base import OptionScorer, Posterior, Progress, posterior_folder, weights_fingerprint

# The fitted T is kept in [1/T_MAX, T_MAX]: the optimum runs off to 0 (every validation answer right, scores
# separable) or to infinity (scores unrelated to the answers); there a bounded T is as good as the limit.
T_MAX = 1e3


def option_matrix(scores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float64 scores padded with 0 and the (N, K) mask of real, finite options (examples may have different
    numbers of options)."""
    width = max(s.numel() for s in scores)
    out = torch.zeros((len(scores), width), dtype=torch.float64)
    valid = torch.zeros((len(scores), width), dtype=torch.bool)
    for i, s in enumerate(scores):
        s = s.detach().to(torch.float64).cpu().reshape(-1)
        finite = torch.isfinite(s)
        out[i, : s.numel()] = torch.where(finite, s, torch.zeros_like(s))
        valid[i, : s.numel()] = finite
    return out, valid


def tempered_nll(scores: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, temperature) -> torch.Tensor:
    """Mean NLL of the gold options under ``softmax(scores / temperature)`` (differentiable in ``temperature``).

    The padded entries are masked after the division, never divided as -inf (their gradient would be NaN).
    """
    logits = (scores / temperature).masked_fill(~valid, float("-inf"))
    return -logits.log_softmax(-1).gather(1, labels[:, None]).mean()


def check_golds(valid: torch.Tensor, gold: torch.Tensor) -> None:
    """A one-line error unless every example's gold index is one of >= 2 scored options."""
    for i, (row, g) in enumerate(zip(valid.tolist(), gold.tolist())):
        if sum(row) < 2 or not 0 <= g < len(row) or not row[g]:
            raise InputError(
                f"validation example {i}: temperature scaling needs a gold answer among >= 2 scored options "
                f"(gold {g}, {sum(row)} options)"
            )


def adapter_fingerprint(model) -> str | None:
    """sha256 of the active adapter's saved tensors (PEFT's adapter state dict), or None for a model without an
    adapter: which adapter weights a fitted temperature belongs to."""
    if model is None or not hasattr(model, "peft_config"):
        return None
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    keys = sorted(state)
    return weights_fingerprint([state[k] for k in keys], keys)


class TemperatureScaling(Posterior):
    """``softmax(scores / T)`` of the model as it is; T from ``fit`` (or given, e.g. 1 to change nothing).

    Args:
        model: The (PEFT) model whose option scores are scaled; None for scores given directly.
        temperature: A known T; None until fitted.
    """

    name: ClassVar[str] = "temperature"
    default_samples: ClassVar[int] = 0
    stochastic: ClassVar[bool] = False
    accepts: ClassVar[tuple[str, ...]] = ("fit_data_path", "fit_limit")

    def __init__(self, model, temperature: float | None = None) -> None:
        super().__init__(model)
        if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
            raise InputError(f"the temperature must be a positive number, got {temperature}")
        self.temperature = None if temperature is None else float(temperature)
        self.nll_before: float | None = None  # mean validation NLL at T = 1 and at the fitted T
        self.nll_after: float | None = None
        self.n_data = 0
        self.fingerprint: str | None = None

    @property
    def is_fitted(self) -> bool:
        return self.temperature is not None

    # --- fitting -------------------------------------------------------------------------------------------------
    def fit(self, data: OptionScorer | Iterable[tuple[torch.Tensor, int]], progress: Progress | None = None) -> None:
        """Fits T on validation examples: an [`OptionScorer`] with gold ``labels`` (``PairScorer(..., labels=golds)``:
        scored exactly as evaluation scores, with the model's current weights), or ``(scores (options,), gold)``
        pairs."""
        if hasattr(data, "scores"):
            labels = getattr(data, "labels", None)
            if labels is None:
                raise InputError("temperature scaling is fitted on validation examples with gold answers; none given")
            with self.mean():
                scores = data.scores(progress)
        else:
            pairs = list(data)
            scores, labels = [s for s, _ in pairs], [g for _, g in pairs]
        self.fit_scores(scores, labels)

    def fit_scores(self, scores: Sequence[torch.Tensor], labels: Sequence[int]) -> float:
        """Fits T to (options,) option scores and gold indices by LBFGS on log T; returns T."""
        if len(scores) == 0 or len(scores) != len(labels):
            raise InputError(
                f"temperature scaling needs validation examples: {len(scores)} scores, {len(labels)} golds"
            )
        matrix, valid = option_matrix(scores)
        gold = torch.as_tensor(list(labels), dtype=torch.long)
        check_golds(valid, gold)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            loss = tempered_nll(matrix, valid, gold, log_t.exp())
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = float(log_t.detach().clamp(-math.log(T_MAX), math.log(T_MAX)).exp())
        with torch.no_grad():
            before = float(tempered_nll(matrix, valid, gold, 1.0))
            after = float(tempered_nll(matrix, valid, gold, fitted))
        if not math.isfinite(after) or after > before:  # never worse than the scores as they are
            fitted, after = 1.0, before
        self.temperature, self.nll_before, self.nll_after = fitted, before, after
        self.n_data, self.fingerprint = len(scores), adapter_fingerprint(self.model)
        return fitted

    # --- predictive ----------------------------------------------------------------------------------------------
    def _require_fit(self) -> float:
        if self.temperature is None:
            raise InputError("temperature scaling is not fitted: fit it on a validation set first (--fit_data_path)")
        return self.temperature

    def sample(self, seed: int):
        raise InputError("temperature scaling is deterministic: use --samples 0")

    def token_temperature(self) -> float:
        """The T fitted on option scores, applied to next-token logits as well (generate.py)."""
        return self._require_fit()

    def scale(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``softmax(s / T)`` of each (options,) score tensor (float64)."""
        t = self._require_fit()
        return [(s.to(torch.float64) / t).softmax(-1) for s in scores]

    def option_probs(
        self, scorer: OptionScorer, samples: int, seed: int, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        self._require_fit()
        with self.mean():
            return self.scale(scorer.scores(progress))

    # --- the scripts: fitted on --fit_data_path (a validation set) or loaded -------------------------------------
    @classmethod
    def from_args(cls, work) -> TemperatureScaling:
        args = work.args
        folder = posterior_folder(args.adapter, cls.name) if args.adapter else None
        if args.fit_data_path:
            if not work.choice_data:
                raise InputError("--posterior temperature scales option scores: it needs a multiple-choice test set")
            posterior = cls(work.model)
            posterior.fit(work.scorer(args.fit_data_path, args.fit_limit), work.progress("temperature fit"))
            if folder:
                posterior.save(folder)
            if not work.quiet:
                saved = f"; saved to {folder}" if folder else ""
                print(
                    f"temperature {posterior.temperature:.4g} fitted on {posterior.n_data} examples (validation "
                    f"NLL {posterior.nll_before:.4f} -> {posterior.nll_after:.4f}){saved}"
                )
            return posterior
        if folder is None or not os.path.isdir(folder):
            where = f"in {folder}" if folder else "for the base model (no --adapter)"
            raise InputError(f"no saved temperature {where}: give --fit_data_path (a validation set) to fit one")
        return cls.load_saved(work.model, folder)

    # --- persistence ---------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "temperature": self._require_fit(),
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n_data": self.n_data,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor([self._require_fit()], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor], config: dict) -> None:
        saved = config.get("fingerprint")
        if saved is not None and saved != adapter_fingerprint(self.model):
            raise InputError(
                "the saved temperature was fitted on other adapter weights (fingerprint differs): refit it with "
                "--fit_data_path"
            )
        if "temperature" not in state or state["temperature"].numel() != 1:
            raise InputError("saved temperature scaling: no temperature in posterior.safetensors")
        t = float(state["temperature"].reshape(()))
        if not (t > 0 and math.isfinite(t)):
            raise InputError(f"saved temperature scaling: the temperature must be positive, got {t}")
        self.temperature, self.fingerprint = t, saved
        self.nll_before, self.nll_after = config.get("nll_before"), config.get("nll_after")
        self.n_data = int(config.get("n_data", 0))
