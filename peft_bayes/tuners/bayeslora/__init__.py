from peft_bayes.tuners.bayeslora.config import (
    BAYESIAN_FACTORS,
    KL_SCHEDULES,
    STD_PARAMS,
    BayesLoraConfig,
    kl_schedule_factor,
)
from peft_bayes.tuners.bayeslora.layer import BayesLoraLayer, gaussian_kl
from peft_bayes.tuners.bayeslora.model import BayesLoraModel
from peft_bayes.tuners.bayeslora.sampling import (
    bayes_layers,
    is_bayesian,
    kl_divergence,
    posterior_sample,
    sampling,
    set_sampling,
)

__all__ = [
    "BAYESIAN_FACTORS",
    "KL_SCHEDULES",
    "STD_PARAMS",
    "BayesLoraConfig",
    "BayesLoraLayer",
    "BayesLoraModel",
    "bayes_layers",
    "gaussian_kl",
    "is_bayesian",
    "kl_divergence",
    "kl_schedule_factor",
    "posterior_sample",
    "sampling",
    "set_sampling",
]
