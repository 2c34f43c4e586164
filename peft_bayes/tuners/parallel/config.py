"""Configuration of parallel adapters (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer
Learning"), as LLM-Adapters offers them."""

from __future__ import annotations

from dataclasses import dataclass

from peft_bayes.registry import peft_type_of
from peft_bayes.tuners.adapter_mlp import AdapterMLPConfig

# He et al.'s scaled parallel adapter ("Scaled_Parallel" in LLM-Adapters) multiplies the adapter's output by 4.
SCALED_PARALLEL_SCALING = 4.0

# Default targets when target_modules is None: LLM-Adapters' choice, the attention input projections.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "k_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "k_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
}


@dataclass
class ParallelAdapterConfig(AdapterMLPConfig):
    """A parallel adapter ``y = W x + s * up(act(down(drop(x))))`` beside each target Linear.

    Fields: see [`AdapterMLPConfig`]. `ParallelAdapterConfig.scaled(...)` is the scaled variant (s = 4).

    Example:
        ```python
        >>> import peft_bayes
        >>> from peft import get_peft_model
        >>> config = peft_bayes.ParallelAdapterConfig.scaled(task_type="CAUSAL_LM", target_modules=["up_proj"])
        >>> model = get_peft_model(base_model, config)
        ```
    """

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_of("parallel")

    @classmethod
    def scaled(cls, **kwargs) -> ParallelAdapterConfig:
        """He et al.'s scaled parallel adapter: ``scaling = 4``."""
        return cls(**{"scaling": SCALED_PARALLEL_SCALING, **kwargs})
