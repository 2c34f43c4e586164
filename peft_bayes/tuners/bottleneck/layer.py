"""Sequential bottleneck adapter layer: the adapter MLP on the output (or the input) of a frozen layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_bayes.tuners.adapter_mlp import AdapterMLPConfig, AdapterMLPLayer


class BottleneckLayer(AdapterMLPLayer):
    """``y = h + s f(h)`` with ``h = base(x)`` (output side) or ``y = base(x + s f(x))`` (input side).

    ``f`` maps out_features -> out_features on the output side and in_features -> in_features on the input side.
    Several active adapters are applied one after another, in the order they are active.
    """

    prefix = "bottleneck_"
    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_scale")
    other_param_names = ("bottleneck_dropout", "bottleneck_act", "bottleneck_scaling", "bottleneck_input_side")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterMLPConfig, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.bottleneck_input_side: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config: AdapterMLPConfig, input_side: bool = False, **kwargs) -> None:
        self.bottleneck_input_side[adapter_name] = input_side
        super().update_layer(adapter_name, config)

    def adapter_shape(self, adapter_name: str) -> tuple[int, int]:
        width = self.in_features if self.bottleneck_input_side[adapter_name] else self.out_features
        return width, width

    def adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        for name in active:
            if self.bottleneck_input_side[name]:
                x = x + self.adapter_mlp(name, x)
        h = self.base_layer(x, *args, **kwargs)
        for name in active:
            if not self.bottleneck_input_side[name]:
                h = h + self.adapter_mlp(name, h)
        return h

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
