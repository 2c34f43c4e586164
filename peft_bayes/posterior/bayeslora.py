"""BayesLoRA's learned posterior (BLoB): a Gaussian over one LoRA factor, trained with the adapter.

Nothing to fit or save here: the posterior's mean and standard deviation are the adapter's own weights
(``lora_A`` / ``bayeslora_rho``). What one evaluation sample is (``draw``):

- ``forward`` (default, BLoB's evaluation): a fresh E and fresh flipout signs on every forward pass of the sample's
  pass over the data (``fresh_draws``, seeded by the sample's seed);
- ``pass``: one draw ``W = M + sigma * E`` of every Bayesian factor fixed for the whole pass (``posterior_sample``):
  one weight-space sample of the network, the same for every batch and token.

The mean pass (N = 0) switches the noise off either way.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from typing import ClassVar

from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum
from peft_bayes.posterior.base import Posterior
from peft_bayes.posterior.point import PointEstimate
from peft_bayes.tuners.bayeslora import fresh_draws, is_bayesian, posterior_sample, sampling
from peft_bayes.tuners.catalogue import saved_peft_type


class EvalDraw(OptionEnum):
    """What one evaluation sample of a BayesLoRA posterior draws (see the module docstring)."""

    FORWARD = "forward"
    PASS = "pass"


DRAWS = EvalDraw.values()


class BayesLoraPosterior(Posterior):
    """The posterior a BayesLoRA adapter carries; ``is_bayesian(model)`` must hold."""

    name: ClassVar[str] = "bayeslora"

    def __init__(self, model, draw: str = "forward") -> None:
        if not is_bayesian(model):
            raise InputError("--posterior bayeslora needs an active BayesLoRA adapter; this model has none")
        if draw not in DRAWS:
            raise InputError(f"draw must be one of {'/'.join(DRAWS)}, got {draw!r}")
        super().__init__(model)
        self.eval_draw = draw

    @classmethod
    def may_sample(cls, args) -> bool:
        """Only with a saved BayesLoRA adapter (checked before the model loads)."""
        return saved_peft_type(getattr(args, "adapter", None)) == "BAYESLORA"

    def summary(self) -> dict:
        return {"posterior": self.name, "bayes_eval_draw": self.eval_draw}

    def for_generation(self) -> BayesLoraPosterior:
        """The same posterior with ``pass`` draws: one weight sample per generated answer."""
        view = copy.copy(self)
        view.eval_draw = EvalDraw.PASS.value
        return view

    def mean(self) -> AbstractContextManager:
        return sampling(self.model, False)

    def sample(self, seed: int) -> AbstractContextManager:
        if self.eval_draw == "forward":
            return fresh_draws(self.model, seed)
        return posterior_sample(self.model, seed=seed)


class AdapterDefault(Posterior):
    """``--posterior auto``: the posterior the adapter carries itself (BayesLoRA's, else the point estimate)."""

    name: ClassVar[str] = "auto"

    @classmethod
    def may_sample(cls, args) -> bool:
        return BayesLoraPosterior.may_sample(args)

    @classmethod
    def from_args(cls, work) -> Posterior:
        if work.model is not None and is_bayesian(work.model):
            return BayesLoraPosterior(work.model)
        return PointEstimate(work.model)
