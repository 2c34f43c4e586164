"""peft_bayes' own PEFT tuner types. Importing this package registers them with PEFT (through ``registry``)."""

from peft_bayes import registry
from peft_bayes.tuners.bottleneck import BottleneckConfig, BottleneckModel
from peft_bayes.tuners.parallel import ParallelAdapterConfig, ParallelAdapterModel

registry.register_tuner("bottleneck", BottleneckConfig, BottleneckModel)
registry.register_tuner("parallel", ParallelAdapterConfig, ParallelAdapterModel)

__all__ = ["BottleneckConfig", "BottleneckModel", "ParallelAdapterConfig", "ParallelAdapterModel"]
