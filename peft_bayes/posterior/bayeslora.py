"""BayesLoRA's learned posterior (BLoB): a Gaussian over one LoRA factor, trained with the adapter.

Nothing to fit or save here: the posterior's mean and standard deviation are the adapter's own weights
(``lora_A`` / ``bayeslora_rho``). A sample fixes one draw ``W = M + sigma * E`` of every Bayesian factor for a whole
pass (``posterior_sample``); the mean pass switches the noise off.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar

from peft_bayes.posterior.base import Posterior
from peft_bayes.tuners.bayeslora import is_bayesian, posterior_sample, sampling


class BayesLoraPosterior(Posterior):
    """The posterior a BayesLoRA adapter carries; ``is_bayesian(model)`` must hold."""

    name: ClassVar[str] = "bayeslora"

    def __init__(self, model) -> None:
        if not is_bayesian(model):
            from peft_bayes.errors import InputError

            raise InputError("--posterior bayeslora needs an active BayesLoRA adapter; this model has none")
        super().__init__(model)

    def mean(self) -> AbstractContextManager:
        return sampling(self.model, False)

    def sample(self, seed: int) -> AbstractContextManager:
        return posterior_sample(self.model, seed=seed)
