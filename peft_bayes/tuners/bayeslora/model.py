"""The ``bayeslora`` tuner: PEFT's ``LoraModel`` creating Bayesian LoRA layers, plus KL and export to plain LoRA."""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from peft_bayes.io import write_files_into
from peft_bayes.tuners.bayeslora.config import BayesLoraConfig
from peft_bayes.tuners.bayeslora.layer import BayesLoraLayer, layer_class_for
from peft_bayes.tuners.bayeslora.sampling import kl_divergence


class BayesLoraModel(LoraModel):
    """Puts Bayesian LoRA layers on the target modules (LoRA's per-architecture defaults when none are given).

    Created by ``peft.get_peft_model(model, BayesLoraConfig(...))`` once ``peft_bayes`` is imported. Everything
    ``LoraModel`` offers works (several adapters, ``merge_and_unload`` of the posterior mean, ``unload``, ...);
    ``kl_divergence`` and ``to_lora`` are added, and reachable from the ``PeftModel`` (``model.kl_divergence()``).
    """

    prefix: str = "lora_"  # shared with LoRA, whose layers ours subclass (as PEFT's AdaLoRA does)

    @staticmethod
    def _create_new_module(config: BayesLoraConfig, adapter_name: str, target, **kwargs) -> BayesLoraLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        cls = layer_class_for(base)
        # Conv1D stores its weight as (in, out): LoRA's fan_in_fan_out transposes the merged update.
        config.fan_in_fan_out = isinstance(base, Conv1D)
        if config.fan_in_fan_out:
            kwargs["is_target_conv_1d_layer"] = True
        return cls(target, adapter_name, config=config, **kwargs)

    def kl_divergence(self, adapter_name: str | None = None) -> torch.Tensor:
        """KL(q || p) summed over every Bayesian factor of ``adapter_name`` (default: the active adapter)."""
        return kl_divergence(self.model, adapter_name)

    def to_lora(self, output_dir: str, adapter_name: str = "default") -> str:
        """Saves the posterior mean of ``adapter_name`` as a plain PEFT LoRA checkpoint in ``output_dir``.

        The folder holds ``adapter_config.json`` (``peft_type`` LORA) and ``adapter_model.safetensors`` with the
        ``lora_A`` / ``lora_B`` weights only: vanilla PEFT loads and merges it without peft_bayes. Files are written
        to a temporary folder first, then moved in.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        from safetensors.torch import save_file

        config = self.peft_config[adapter_name]
        lora_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        plain = LoraConfig(**copy.deepcopy({k: getattr(config, k) for k in lora_fields if k != "peft_type"}))
        plain.inference_mode = True
        weights = {}
        for name, tensor in self.model.state_dict().items():
            parts = name.split(".")
            if any(p in ("lora_A", "lora_B") for p in parts) and f".{adapter_name}." in f".{name}.":
                key = name.replace(f".{adapter_name}.", ".")  # PEFT's checkpoint keys omit the adapter name
                weights[f"base_model.model.{key}"] = tensor.detach().to("cpu").contiguous()

        def write(staging: str) -> None:
            plain.save_pretrained(staging)
            save_file(weights, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})

        return write_files_into(output_dir, write, ".to-lora-")
