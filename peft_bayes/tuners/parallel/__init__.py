from peft_bayes.tuners.parallel.config import SCALED_PARALLEL_SCALING, TARGET_MODULES, ParallelAdapterConfig
from peft_bayes.tuners.parallel.layer import ParallelLayer
from peft_bayes.tuners.parallel.model import ParallelAdapterModel

__all__ = [
    "SCALED_PARALLEL_SCALING",
    "TARGET_MODULES",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "ParallelLayer",
]
