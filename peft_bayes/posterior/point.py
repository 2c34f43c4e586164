"""The adapter as it is: one deterministic pass with its weights (MAP), the posterior of a plain adapter."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import ClassVar

from peft_bayes.posterior.base import Posterior


class PointEstimate(Posterior):
    """No distribution over the weights: ``samples`` must be 0, every pass uses the model as it is."""

    name: ClassVar[str] = "map"
    default_samples: ClassVar[int] = 0
    stochastic: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ("none",)  # train.py's spelling: no posterior, the weights as they are
    train_time: ClassVar[bool] = True  # train.py --posterior none: nothing to collect or fit

    def summary(self) -> dict:
        return {"posterior": self.name}

    def sample(self, seed: int) -> AbstractContextManager:
        return contextlib.nullcontext(self.model)
