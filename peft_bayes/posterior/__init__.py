"""Posteriors over adapter weights, behind one interface (:class:`Posterior`): evaluation and the benches talk to
that interface only. ``POSTERIORS`` is the table of ``--posterior`` names: the scripts take their choices, flags,
flag checks, construction and summaries from the classes in it, so adding a method is its own file and one
``register_posterior`` call (this table's order is the order of ``--posterior``'s choices and of the names in flag
errors)."""

from __future__ import annotations

from peft_bayes.errors import InputError
from peft_bayes.posterior.base import OptionScorer, Posterior, Workflow, posterior_folder, read_saved, sample_seed
from peft_bayes.posterior.bayeslora import AdapterDefault, BayesLoraPosterior
from peft_bayes.posterior.ensemble import Ensemble
from peft_bayes.posterior.laplace import Laplace, LaplaceOptions
from peft_bayes.posterior.likelihood import ChoiceBatch, LMBatch
from peft_bayes.posterior.mc_dropout import MCDropout
from peft_bayes.posterior.multiswag import MultiSwag
from peft_bayes.posterior.point import PointEstimate
from peft_bayes.posterior.swag import Swag, SwagCollector, SwagOptions
from peft_bayes.posterior.temperature import TemperatureScaling
from peft_bayes.posterior.tfb import Tfb
from peft_bayes.tuners.bayeslora import is_bayesian

POSTERIORS: dict[str, type[Posterior]] = {}


def register_posterior(cls: type[Posterior]) -> type[Posterior]:
    """Adds ``cls`` to the table under ``cls.name`` (also usable as a class decorator); a taken name or alias is an
    error."""
    names = {cls.name, *cls.aliases}
    for other in POSTERIORS.values():
        if other is not cls and names & {other.name, *other.aliases}:
            raise ValueError(f"posterior name(s) {sorted(names & {other.name, *other.aliases})} are taken")
    POSTERIORS[cls.name] = cls
    return cls


for _cls in (
    AdapterDefault,
    PointEstimate,
    BayesLoraPosterior,
    Laplace,
    TemperatureScaling,
    Tfb,
    Ensemble,
    Swag,
    MultiSwag,
    MCDropout,
):
    register_posterior(_cls)


def default_posterior(model) -> Posterior:
    """The posterior a model carries itself: BayesLoRA's when it has an active BayesLoRA adapter, else the point
    estimate (a deterministic pass)."""
    if model is not None and is_bayesian(model):
        return BayesLoraPosterior(model)
    return PointEstimate(model)


def posterior_class(name: str) -> type[Posterior]:
    """The class of ``--posterior name`` (or one of its aliases); a one-line error naming the known ones otherwise."""
    for cls in POSTERIORS.values():
        if name == cls.name or name in cls.aliases:
            return cls
    raise InputError(f"--posterior {name!r} is unknown; known: {', '.join(sorted(POSTERIORS))}")


def load_posterior(model, folder: str) -> Posterior:
    """A saved posterior (``Posterior.save``) for ``model``; it checks that it was fitted on these weights."""
    config, _ = read_saved(folder)
    return posterior_class(str(config.get("posterior"))).load_saved(model, folder)


__all__ = [
    "POSTERIORS",
    "AdapterDefault",
    "BayesLoraPosterior",
    "ChoiceBatch",
    "Ensemble",
    "LMBatch",
    "Laplace",
    "LaplaceOptions",
    "MCDropout",
    "MultiSwag",
    "OptionScorer",
    "PointEstimate",
    "Posterior",
    "Swag",
    "SwagCollector",
    "SwagOptions",
    "TemperatureScaling",
    "Tfb",
    "Workflow",
    "default_posterior",
    "load_posterior",
    "posterior_class",
    "posterior_folder",
    "register_posterior",
    "sample_seed",
]
