"""The ``bottleneck`` tuner: sequential bottleneck adapters (AdapterH / AdapterP / LLM-Adapters placement)."""

from __future__ import annotations

from peft_bayes.tuners.adapter_mlp import AdapterMLPModel, module_matches
from peft_bayes.tuners.bottleneck.config import MLP_INPUT_PROJECTIONS, PRESETS, BottleneckConfig
from peft_bayes.tuners.bottleneck.layer import BottleneckLayer


class BottleneckModel(AdapterMLPModel):
    """Puts a [`BottleneckLayer`] on each target module of a transformers model.

    Created by `peft.get_peft_model(model, BottleneckConfig(...))` once `peft_bayes` is imported.
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = PRESETS["adapterh"]

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            table = PRESETS[peft_config.preset]
            if model_type not in table:
                raise ValueError(
                    f"no {peft_config.preset} placement is known for model type {model_type!r}; "
                    "please specify `target_modules`"
                )
            peft_config.target_modules = set(table[model_type])
            if peft_config.preset == "llm-adapters" and peft_config.input_side_modules is None:
                peft_config.input_side_modules = set(MLP_INPUT_PROJECTIONS[model_type])
        return peft_config

    def layer_kwargs(self, config: BottleneckConfig, current_key: str) -> dict:
        return {"input_side": module_matches(config.input_side_modules, current_key)}
