"""peft_bayes: Bayesian and fast parameter-efficient fine-tuning on top of HuggingFace PEFT.

Importing this package checks the installed PEFT version and registers the package's tuner types with PEFT.
"""

from peft_bayes import _quiet

_quiet.install()  # before peft (and through it bitsandbytes) is imported: see _quiet.py for each message and why

from peft_bayes import registry  # noqa: E402
from peft_bayes.errors import InputError  # noqa: E402
from peft_bayes.models import packaged_models, resolve_model  # noqa: E402

__version__ = "0.1.0"

registry.check_peft_version()

from peft_bayes.tuners import (  # noqa: E402  (registers our tuners; needs the version check above first)
    BayesLoraConfig,
    BayesLoraModel,
    BottleneckConfig,
    BottleneckModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
)
from peft_bayes.tuners.bayeslora import (  # noqa: E402
    is_bayesian,
    kl_divergence,
    posterior_sample,
    sampling,
    set_sampling,
)

__all__ = [
    "BayesLoraConfig",
    "BayesLoraModel",
    "BottleneckConfig",
    "BottleneckModel",
    "InputError",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "__version__",
    "is_bayesian",
    "kl_divergence",
    "packaged_models",
    "posterior_sample",
    "registry",
    "resolve_model",
    "sampling",
    "set_sampling",
]
