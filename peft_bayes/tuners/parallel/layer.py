"""Parallel adapter layer: the adapter MLP reads the layer's input and adds to its output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_bayes.tuners.adapter_mlp import AdapterMLPConfig, AdapterMLPLayer


class ParallelLayer(AdapterMLPLayer):
    """``y = base(x) + sum over active adapters of s f(x)``, ``f``: in_features -> out_features."""

    prefix = "parallel_"
    adapter_layer_names = ("parallel_down", "parallel_up", "parallel_scale")
    other_param_names = ("parallel_dropout", "parallel_act", "parallel_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterMLPConfig, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def adapter_shape(self, adapter_name: str) -> tuple[int, int]:
        return self.in_features, self.out_features

    def adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for name in active:
            y = y + self.adapter_mlp(name, x).to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "parallel." + super().__repr__()
