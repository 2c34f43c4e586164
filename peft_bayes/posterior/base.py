"""The one interface evaluation talks to: a distribution over a PEFT model's adapter weights.

Every way of being Bayesian about an adapter (BayesLoRA's learned posterior, Laplace, ...) is a [`Posterior`] with
the same small surface:

- ``fit(data)`` where the method needs data (Laplace's curvature); nothing for the others;
- ``passes(samples, seed)``: one context per evaluation pass, each holding one posterior sample of the weights (or
  the mean when ``samples == 0``), used by batched generation with votes and by the default option predictive;
- ``option_probs(scorer, samples, seed)``: the predictive option probabilities of multiple-choice examples,
  averaged over samples (probabilities, not logits) or in closed form (Laplace's linearised predictive);
- ``save(folder)`` / ``load_posterior(model, folder)``: safetensors + a JSON config, in a folder next to the adapter.

Evaluation hands the posterior an [`OptionScorer`]: the fast scores of the current weights (``scores``), and the
same scores as differentiable batches (``batches``) for methods that need gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import torch

from peft_bayes.errors import InputError
from peft_bayes.io import read_json, write_folder_atomically
from peft_bayes.posterior.likelihood import ChoiceBatch

CONFIG_NAME = "posterior_config.json"
WEIGHTS_NAME = "posterior.safetensors"
POSTERIOR_DIR = "posterior"

Progress = Callable[[int, int], None]


class OptionScorer(Protocol):
    """What evaluation gives a posterior to score multiple-choice examples with the model's current weights."""

    n_examples: int

    def scores(self, progress: Progress | None = None) -> list[torch.Tensor]:
        """One (options,) float64 tensor of option log-scores per example (no gradients)."""

    def batches(self, batch_size: int | None = None) -> Iterable[ChoiceBatch]:
        """The same examples as differentiable batches (the ``full`` path: one row per option), ``batch_size``
        examples each (default: the scorer's)."""


def sample_seed(seed: int, index: int) -> int:
    """Seed of posterior sample ``index`` under ``--seed seed`` (distinct for distinct pairs, index < 100003)."""
    return seed * 100003 + index


def weights_fingerprint(tensors: Iterable[torch.Tensor], names: Iterable[str] | None = None) -> str:
    """sha256 of the tensors' float32 bytes in order, each after its name when ``names`` are given: which trained
    adapter weights a saved posterior belongs to (loading compares it with the weights of the model at hand)."""
    digest = hashlib.sha256()
    for tensor, name in zip(tensors, names if names is not None else itertools.repeat(None)):
        if name is not None:
            digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pass_tick(progress: Progress | None, index: int, n_passes: int):
    """The ``tick(done, n)`` of pass ``index`` of ``n_passes``: reports ``progress`` over all passes (None without)."""
    if progress is None:
        return None
    return lambda done, n: progress(index * n + done, n_passes * n)


class Posterior:
    """Base class: a posterior over the active adapter's weights of ``model`` (a ``PeftModel``).

    Subclasses set ``name`` (the ``--posterior`` name) and override ``sample`` (and ``mean`` where the mean is
    not the model as it is), and where they need data ``fit``; ``config`` / ``state_dict`` / ``load_state_dict``
    where they have state to save.
    """

    name: ClassVar[str] = ""
    default_samples: ClassVar[int] = 10  # --samples auto
    stochastic: ClassVar[bool] = True  # False: one deterministic pass only (samples must be 0)

    def __init__(self, model) -> None:
        self.model = model

    # --- fitting -------------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return True

    def fit(self, data: Any, progress: Progress | None = None) -> None:
        """Fits the posterior on ``data``; methods without anything to fit say so."""
        raise InputError(f"--posterior {self.name} has nothing to fit (drop --fit_data_path)")

    # --- what evaluation asks --------------------------------------------------------------------------------
    def mean(self) -> AbstractContextManager:
        """Context of the deterministic pass (``samples == 0``): the posterior mean / MAP weights."""
        return contextlib.nullcontext(self.model)

    def sample(self, seed: int) -> AbstractContextManager:
        """Context holding one posterior sample of the weights, drawn from ``seed`` only (not from the batch)."""
        raise NotImplementedError

    def resolve_samples(self, requested: int | None) -> int:
        """``--samples``: ``None`` (auto) gives ``default_samples``; N > 0 on a deterministic posterior is an error."""
        if requested is None:
            return self.default_samples if self.stochastic else 0
        if requested > 0 and not self.stochastic:
            raise InputError(
                f"--samples {requested} needs an adapter with a posterior (bayeslora); "
                "this one is deterministic: use --samples 0"
            )
        return requested

    def passes(self, samples: int, seed: int, progress: Progress | None = None) -> Iterator[tuple]:
        """One ``(context, tick)`` per evaluation pass: ``samples`` posterior draws, or one mean pass when 0.

        ``tick(done, n)``, called by the pass, reports ``progress(done so far over all passes, total)``; None
        without ``progress``.
        """
        n_passes = max(samples, 1)
        for index in range(n_passes):
            context = self.mean() if samples == 0 else self.sample(sample_seed(seed, index))
            yield context, pass_tick(progress, index, n_passes)

    def option_probs(
        self, scorer: OptionScorer, samples: int, seed: int, progress: Progress | None = None
    ) -> list[torch.Tensor]:
        """Option probabilities (not logits) averaged over the passes of ``passes(samples, seed)``: ``samples``
        weight samples, the mean's when 0; an ensemble's or MultiSWAG's members through their own ``passes``.

        Returns:
            One (options,) float64 tensor per example, summing to 1.
        """
        total: list[torch.Tensor] | None = None
        n_passes = 0
        for context, tick in self.passes(samples, seed, progress):
            with context:
                probs = [s.to(torch.float64).softmax(-1) for s in scorer.scores(tick)]
            total = probs if total is None else [t + p for t, p in zip(total, probs)]
            n_passes += 1
        return [t / n_passes for t in total]

    # --- persistence -----------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-able settings; ``posterior`` (the name) is added on saving."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], config: dict) -> None:
        """Restores what ``state_dict`` / ``config`` saved (checking it fits ``self.model``)."""

    def save(self, folder: str) -> str:
        """Writes ``posterior_config.json`` and ``posterior.safetensors`` to ``folder`` through a temporary folder
        and a rename, so an interrupted save never leaves a broken posterior. Returns ``folder``."""
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            state, seen = {}, set()
            for key, value in self.state_dict().items():
                value = value.detach().contiguous().cpu()
                if value.untyped_storage().data_ptr() in seen:  # shared (e.g. one K-FAC input factor): own copy
                    value = value.clone()
                seen.add(value.untyped_storage().data_ptr())
                state[key] = value
            save_file(state, os.path.join(tmp, WEIGHTS_NAME))
            with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump({"posterior": self.name, **self.config()}, f, indent=2)

        return write_folder_atomically(folder, write, ".posterior-")


def posterior_folder(adapter_dir: str, name: str) -> str:
    """Where the posterior ``name`` of the adapter in ``adapter_dir`` is saved: ``<adapter>/posterior/<name>``."""
    return os.path.join(adapter_dir, POSTERIOR_DIR, name)


def read_saved(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved posterior; a one-line error when the folder holds none."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise InputError(f"{folder}: no saved posterior there ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    return read_json(config_path), load_file(weights_path)
