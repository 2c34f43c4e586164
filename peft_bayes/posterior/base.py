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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
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

    def for_model(self, model) -> OptionScorer:
        """The same examples scored by another model."""

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


@contextlib.contextmanager
def swapped_weights(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Context with each of ``params`` holding the matching tensor of ``values`` (cast to its dtype and device): a
    posterior sample or mean in the model. The original tensors are copied back on exit, bit for bit, even after an
    exception."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v.reshape(p.shape).to(device=p.device, dtype=p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@dataclass
class Workflow:
    """What train.py and evaluate.py hand a posterior class to fit, load or save itself (``from_args``,
    ``after_training``): the parsed flags, the model, its tokenizer and prompt template, and the data builders of
    the evaluation layer, which posterior/ does not import.

    ``batches(path, limit, likelihood, batch_size)`` gives the differentiable fit batches of a data file (``choice``:
    its options scored as evaluation scores them; ``lm``: its response tokens); ``scorer(path, limit)`` an option
    scorer of a multiple-choice file; ``progress(label)`` a progress callback (None when quiet).
    """

    args: Any
    model: Any
    tokenizer: Any = None
    prompter: Any = None
    choice_data: bool = True
    batches: Callable[..., list] | None = None
    scorer: Callable[..., Any] | None = None
    progress: Callable[[str], Progress | None] = lambda label: None
    quiet: bool = False


class Posterior:
    """Base class: a posterior over the active adapter's weights of ``model`` (a ``PeftModel``).

    Subclasses set ``name`` (the ``--posterior`` name) and override ``sample`` (and ``mean`` where the mean is
    not the model as it is), and where they need data ``fit``; ``config`` / ``state_dict`` / ``load_state_dict``
    where they have state to save.

    Each class also describes itself to the scripts, which hold no list of posteriors (``POSTERIORS`` in
    ``peft_bayes.posterior`` is the table): its other names (``aliases``), the posterior flags it accepts
    (``accepts``: a flag given with a posterior that does not accept it is a one-line error) and the ones it adds to
    the parsers (``add_flags``), whether ``--adapter`` and ``--members`` are its member adapters
    (``member_adapters``), whether train.py makes it (``train_time``: ``collector`` during training,
    ``after_training`` after it), its own flag checks (``check_args``), how evaluate.py gets it from the flags
    (``from_args``: fitted, or loaded from next to the adapter) and what it adds to the evaluation summary
    (``summary``).
    """

    name: ClassVar[str] = ""
    default_samples: ClassVar[int] = 10  # --samples auto
    stochastic: ClassVar[bool] = True  # False: one deterministic pass only (samples must be 0)
    aliases: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[tuple[str, ...]] = ()
    member_adapters: ClassVar[bool] = False
    train_time: ClassVar[bool] = False

    def __init__(self, model) -> None:
        self.model = model

    # --- the scripts' view: flags, construction, summary ---------------------------------------------------
    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        """Adds the flags this posterior owns to train.py's (``training``) or evaluate.py's parser; defaults None,
        so that a flag that was not given is distinguishable."""

    @classmethod
    def check_args(cls, args) -> None:
        """One-line errors for values of its flags (after the scripts checked that every given flag applies)."""

    @classmethod
    def may_sample(cls, args) -> bool:
        """Whether ``--samples N > 0`` can apply, decided before the model loads."""
        return cls.stochastic

    @classmethod
    def from_args(cls, work: Workflow) -> Posterior:
        """The posterior evaluate.py evaluates with, on ``work.model``: fitted on ``--fit_data_path`` where it
        fits one, else loaded from next to the adapter, or made from the model as it is."""
        return cls(work.model)

    @classmethod
    def collector(cls, args, model, steps_per_epoch: int):
        """train.py: a ``TrainerCallback`` that collects this posterior during training, or None."""
        return None

    @classmethod
    def after_training(cls, work: Workflow, collector) -> None:
        """train.py, after the adapter is saved (every rank): fit or save this posterior next to it."""

    def summary(self) -> dict:
        """What the evaluation summary records about this posterior: its name and settings."""
        return {"posterior": self.name, self.name: self.config()}

    @classmethod
    def load_saved(cls, model, folder: str) -> Posterior:
        """This posterior saved in ``folder`` (``save``), for ``model``; it checks the folder holds one of this kind
        and (``load_state_dict``) that it was fitted on these weights."""
        config, state = read_saved(folder)
        if config.get("posterior") != cls.name:
            raise InputError(f"{folder}: holds a {config.get('posterior')!r} posterior, not {cls.name!r}")
        posterior = cls.from_config(model, config) if hasattr(cls, "from_config") else cls(model)
        posterior.load_state_dict(state, config)
        return posterior

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

    def for_generation(self) -> Posterior:
        """This posterior with each pass holding one draw for a whole generated answer (generate.py); itself,
        unless its passes draw afresh on every forward."""
        return self

    def token_temperature(self) -> float:
        """What next-token logits are divided by when generate.py scores an answer's tokens: 1 (the model's own),
        a fitted temperature for temperature scaling."""
        return 1.0

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


def member_folders(args) -> list[str]:
    """The member adapters of an ensemble-like posterior: ``--adapter`` and then ``--members``."""
    return ([args.adapter] if getattr(args, "adapter", None) else []) + list(getattr(args, "members", None) or [])


def require_adapter(args, name: str) -> str:
    """``--adapter`` of a posterior over its weights; a one-line error without one."""
    if not getattr(args, "adapter", None):
        raise InputError(f"--posterior {name} needs --adapter (the posterior is over the adapter's weights)")
    return args.adapter


def read_saved(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved posterior; a one-line error when the folder holds none."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise InputError(f"{folder}: no saved posterior there ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    return read_json(config_path), load_file(weights_path)
