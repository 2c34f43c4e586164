"""Posteriors over adapter weights, behind one interface (:class:`Posterior`): evaluation and the benches talk to
that interface only. ``POSTERIORS`` maps ``--posterior`` names to classes; adding a method is one file here and
one entry there."""

from __future__ import annotations

from peft_bayes.errors import InputError
from peft_bayes.posterior.base import OptionScorer, Posterior, posterior_folder, read_saved, sample_seed
from peft_bayes.posterior.bayeslora import BayesLoraPosterior
from peft_bayes.posterior.ensemble import Ensemble
from peft_bayes.posterior.laplace import Laplace, LaplaceOptions
from peft_bayes.posterior.likelihood import ChoiceBatch, LMBatch
from peft_bayes.posterior.mc_dropout import MCDropout
from peft_bayes.posterior.multiswag import MultiSwag
from peft_bayes.posterior.point import PointEstimate
from peft_bayes.posterior.swag import Swag, SwagCollector, SwagOptions
from peft_bayes.posterior.temperature import TemperatureScaling

POSTERIORS: dict[str, type[Posterior]] = {
    PointEstimate.name: PointEstimate,
    BayesLoraPosterior.name: BayesLoraPosterior,
    Laplace.name: Laplace,
    MCDropout.name: MCDropout,
    Ensemble.name: Ensemble,
    TemperatureScaling.name: TemperatureScaling,
    Swag.name: Swag,
    MultiSwag.name: MultiSwag,
}


def default_posterior(model) -> Posterior:
    """The posterior a model carries itself: BayesLoRA's when it has an active BayesLoRA adapter, else the point
    estimate (a deterministic pass)."""
    from peft_bayes.tuners.bayeslora import is_bayesian

    if model is not None and is_bayesian(model):
        return BayesLoraPosterior(model)
    return PointEstimate(model)


def posterior_class(name: str) -> type[Posterior]:
    """The class of ``--posterior name``; a one-line error naming the known ones otherwise."""
    if name not in POSTERIORS:
        raise InputError(f"--posterior {name!r} is unknown; known: {', '.join(sorted(POSTERIORS))}")
    return POSTERIORS[name]


def load_posterior(model, folder: str) -> Posterior:
    """A saved posterior (``Posterior.save``) for ``model``; it checks that it was fitted on these weights."""
    config, state = read_saved(folder)
    cls = posterior_class(str(config.get("posterior")))
    posterior = cls.from_config(model, config) if hasattr(cls, "from_config") else cls(model)
    posterior.load_state_dict(state, config)
    return posterior


__all__ = [
    "POSTERIORS",
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
    "default_posterior",
    "load_posterior",
    "posterior_class",
    "posterior_folder",
    "sample_seed",
]
