"""peft_bayes' own PEFT tuner types. Importing this package registers them with PEFT (through ``registry``)."""

from peft_bayes import registry
from peft_bayes.tuners.bayeslora import BayesLoraConfig, BayesLoraModel
from peft_bayes.tuners.bottleneck import BottleneckConfig, BottleneckModel
from peft_bayes.tuners.parallel import ParallelAdapterConfig, ParallelAdapterModel

registry.register_tuner("bottleneck", BottleneckConfig, BottleneckModel)
registry.register_tuner("parallel", ParallelAdapterConfig, ParallelAdapterModel)
registry.register_tuner("bayeslora", BayesLoraConfig, BayesLoraModel, prefix="lora_", shares_prefix_with="LORA")

__all__ = [
    "BayesLoraConfig",
    "BayesLoraModel",
    "BottleneckConfig",
    "BottleneckModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
]
