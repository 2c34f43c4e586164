from peft_bayes.tuners.bottleneck.config import MLP_INPUT_PROJECTIONS, PRESETS, BottleneckConfig
from peft_bayes.tuners.bottleneck.layer import BottleneckLayer
from peft_bayes.tuners.bottleneck.model import BottleneckModel

__all__ = ["MLP_INPUT_PROJECTIONS", "PRESETS", "BottleneckConfig", "BottleneckLayer", "BottleneckModel"]
