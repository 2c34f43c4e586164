from peft_bayes.tuners.bayeslora.config import (
    BAYESIAN_FACTORS,
    KL_SCHEDULES,
    STD_PARAMS,
    BayesLoraConfig,
    blob_cycle_length,
    blob_kl_weight,
    kl_schedule_factor,
)
from peft_bayes.tuners.bayeslora.layer import BayesLoraLayer, gaussian_kl
from peft_bayes.tuners.bayeslora.model import BayesLoraModel
from peft_bayes.tuners.bayeslora.sampling import (
    bayes_layers,
    fresh_draws,
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
    "fresh_draws",
    "blob_cycle_length",
    "blob_kl_weight",
    "gaussian_kl",
    "is_bayesian",
    "kl_divergence",
    "kl_schedule_factor",
    "posterior_sample",
    "sampling",
    "set_sampling",
]
