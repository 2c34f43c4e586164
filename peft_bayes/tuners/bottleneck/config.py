"""Configuration of sequential bottleneck adapters: Houlsby et al. 2019 (AdapterH), Pfeiffer et al. 2021 (AdapterP)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_bayes.registry import peft_type_of
from peft_bayes.tuners.adapter_mlp import AdapterMLPConfig

# Placement presets: which Linear layers of each architecture get an adapter when target_modules is None.
# AdapterH (Houlsby): after the attention output projection and after the MLP output projection.
# AdapterP (Pfeiffer): after the MLP output projection only.
# llm-adapters: LLM-Adapters' `bottleneck` default: an adapter on the input of the MLP's input projection(s)
#   and one on the output of its output projection.
PRESETS: dict[str, dict[str, list[str]]] = {
    "adapterh": {
        "llama": ["o_proj", "down_proj"],
        "gpt2": ["attn.c_proj", "mlp.c_proj"],
        "opt": ["out_proj", "fc2"],
        "bloom": ["self_attention.dense", "dense_4h_to_h"],
        "gptj": ["out_proj", "fc_out"],
        "gpt_neox": ["attention.dense", "dense_4h_to_h"],
    },
    "adapterp": {
        "llama": ["down_proj"],
        "gpt2": ["mlp.c_proj"],
        "opt": ["fc2"],
        "bloom": ["dense_4h_to_h"],
        "gptj": ["fc_out"],
        "gpt_neox": ["dense_4h_to_h"],
    },
    "llm-adapters": {
        "llama": ["gate_proj", "up_proj", "down_proj"],
        "gpt2": ["mlp.c_fc", "mlp.c_proj"],
        "opt": ["fc1", "fc2"],
        "bloom": ["dense_h_to_4h", "dense_4h_to_h"],
        "gptj": ["fc_in", "fc_out"],
        "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    },
}

# MLP input projections: LLM-Adapters puts a sequential adapter on their *input* ("mh_adapter"), x + s f(x) -> W.
MLP_INPUT_PROJECTIONS: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj"],
    "gpt2": ["mlp.c_fc"],
    "opt": ["fc1"],
    "bloom": ["dense_h_to_4h"],
    "gptj": ["fc_in"],
    "gpt_neox": ["dense_h_to_4h"],
}


@dataclass
class BottleneckConfig(AdapterMLPConfig):
    """A sequential bottleneck adapter ``h + s * up(act(down(drop(h))))`` on the output of each target module.

    Args:
        preset: Placement when ``target_modules`` is None: ``"adapterh"`` (default), ``"adapterp"`` or
            ``"llm-adapters"`` (see ``PRESETS``). Ignored when ``target_modules`` is given.
        input_side_modules: Target modules whose adapter acts on the layer's *input* instead (``x + s * f(x)`` is
            fed into the layer), as LLM-Adapters does for MLP input projections. Must be among ``target_modules``.
        bottleneck_size, non_linearity, adapter_dropout, scaling, init_weights, target_modules, exclude_modules,
        modules_to_save: see [`AdapterMLPConfig`].

    Example:
        ```python
        >>> import peft_bayes
        >>> from peft import get_peft_model
        >>> config = peft_bayes.BottleneckConfig(task_type="CAUSAL_LM", preset="adapterp", bottleneck_size=64)
        >>> model = get_peft_model(base_model, config)  # adapters after every MLP output projection
        ```
    """

    preset: str = field(
        default="adapterh",
        metadata={"help": "Placement if target_modules is None: 'adapterh', 'adapterp' or 'llm-adapters'."},
    )
    input_side_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Target modules whose adapter transforms the layer's input rather than its output."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_of("bottleneck")
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is unknown; expected one of {sorted(PRESETS)}")
        if isinstance(self.input_side_modules, (list, tuple)):
            self.input_side_modules = set(self.input_side_modules)
        if isinstance(self.input_side_modules, set) and isinstance(self.target_modules, set):
            stray = sorted(self.input_side_modules - self.target_modules)
            if stray:
                raise ValueError(f"input_side_modules {stray} are not among target_modules")
