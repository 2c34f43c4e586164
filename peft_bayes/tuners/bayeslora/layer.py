"""Bayesian LoRA layers: PEFT's LoRA layers (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 8-bit and 4-bit) with a
Gaussian posterior over one factor.

The layers are PEFT's own classes, subclassed; what changes is plugged in through PEFT's ``LoraVariant`` hook (the
mechanism DoRA uses): ``BayesLoraVariant.forward`` adds the sampled update, its merge functions merge the posterior
mean. The mean of the Bayesian factor is LoRA's ``lora_A`` (or ``lora_B``) weight, so merging, ``to_lora`` export and
every LoRA utility see a plain LoRA adapter at the posterior mean.

What a forward pass draws depends on the layer's sampling mode (see ``sampling.py``): in training mode a fresh E
(and flipout signs) per forward; in eval mode the mean; inside ``posterior_sample`` one fixed draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_bayes.kernels.sampled_lora import add_sampled_lora
from peft_bayes.tuners.bayeslora.config import BayesLoraConfig

SAMPLE, MEAN = "sample", "mean"


@dataclass(frozen=True)
class BayesSpec:
    """Per-adapter settings a layer needs at forward time."""

    factor: str  # "A" or "B"
    std_param: str  # "square" or "softplus"
    flipout: bool
    prior_std: float


def std_from_rho(rho: torch.Tensor, std_param: str) -> torch.Tensor:
    return rho * rho if std_param == "square" else F.softplus(rho)


def rho_from_std(std: torch.Tensor, std_param: str) -> torch.Tensor:
    if std_param == "square":
        return std.sqrt()
    return std + torch.log(-torch.expm1(-std))  # softplus^-1(s) = s + log(1 - e^-s), stable for small s


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Sum over entries of KL(N(mean, std^2) || N(0, prior_std^2)), computed in float32 (float64 inputs stay)."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    mean, std = mean.to(dtype), std.to(dtype)
    var_ratio = (std / prior_std) ** 2
    return (0.5 * (var_ratio + (mean / prior_std) ** 2 - 1) - torch.log(std / prior_std)).sum()


class BayesLoraLayer(LoraLayer):
    """Mixin for PEFT's LoRA layer classes: adds ``bayeslora_rho`` and resolves to [`BayesLoraVariant`]."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("bayeslora_rho",)
    other_param_names = LoraLayer.other_param_names + ("bayeslora_spec",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: BayesLoraConfig, **kwargs) -> None:
        if not hasattr(self, "bayeslora_rho"):
            self.bayeslora_rho = nn.ParameterDict()
            self.bayeslora_spec: dict[str, BayesSpec] = {}
            self.bayeslora_mode: str | None = None  # None: sample in training mode, mean in eval mode
            self.bayeslora_fixed_eps: dict[str, torch.Tensor] = {}  # set by posterior_sample
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: BayesLoraConfig, **kwargs) -> LoraVariant:
        return BayesLoraVariant()

    def bayes_factor(self, adapter_name: str) -> nn.Linear:
        """The ``nn.Linear`` whose weight is the posterior mean of the Bayesian factor."""
        spec = self.bayeslora_spec[adapter_name]
        return (self.lora_A if spec.factor == "A" else self.lora_B)[adapter_name]

    def posterior_std(self, adapter_name: str) -> torch.Tensor:
        return std_from_rho(self.bayeslora_rho[adapter_name], self.bayeslora_spec[adapter_name].std_param)

    def kl_divergence(self, adapter_name: str) -> torch.Tensor:
        """Closed-form KL(q || p) of this layer's Bayesian factor for ``adapter_name``."""
        spec = self.bayeslora_spec[adapter_name]
        return gaussian_kl(self.bayes_factor(adapter_name).weight, self.posterior_std(adapter_name), spec.prior_std)

    def draw_fixed_eps(self, adapter_name: str, generator: torch.Generator) -> None:
        """Fixes one draw E of the posterior for every later forward (used by ``posterior_sample``)."""
        rho = self.bayeslora_rho[adapter_name]
        eps = torch.randn(rho.shape, generator=generator, dtype=torch.float32)
        self.bayeslora_fixed_eps[adapter_name] = eps.to(device=rho.device, dtype=rho.dtype)

    def draw_mode(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(std, fixed E) for this forward pass: (None, None) for the posterior mean, (std, None) for fresh draws,
        (std, E) inside ``posterior_sample``."""
        if adapter_name in self.bayeslora_fixed_eps:
            return self.posterior_std(adapter_name), self.bayeslora_fixed_eps[adapter_name]
        mode = self.bayeslora_mode or (SAMPLE if self.training else MEAN)
        return (None, None) if mode == MEAN else (self.posterior_std(adapter_name), None)


class BayesLoraVariant(LoraVariant):
    """The Bayesian forward and mean merges, as a PEFT LoRA variant (static methods, as PEFT's variants)."""

    @staticmethod
    def init(module: BayesLoraLayer, adapter_name: str, config: BayesLoraConfig, **kwargs: Any) -> None:
        spec = BayesSpec(config.bayesian_factor, config.std_param, config.flipout, float(config.prior_std))
        module.bayeslora_spec[adapter_name] = spec
        weight = module.bayes_factor(adapter_name).weight
        rho = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            # BLoB: u ~ U(eps / sqrt(2), eps), sigma = u^2; the same initial sigma for the softplus parametrisation.
            eps = float(config.init_std)
            u = torch.empty(weight.shape, dtype=torch.float32).uniform_(eps / math.sqrt(2), eps)
            rho = rho_from_std(u * u, config.std_param).to(device=weight.device, dtype=weight.dtype)
        module.bayeslora_rho[adapter_name] = nn.Parameter(rho, requires_grad=weight.requires_grad)

    @staticmethod
    def merge_safe(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: BayesLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: BayesLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x.to(lora_a.weight.dtype))
        std, eps = module.draw_mode(active_adapter)
        if std is None:
            # The posterior mean is a plain LoRA: PEFT's own module calls, so module hooks (a Laplace posterior's
            # curvature over the means) see lora_A and lora_B as in LoRA.
            return result + (lora_b(lora_a(x)) * module.scaling[active_adapter]).to(result.dtype)
        spec = module.bayeslora_spec[active_adapter]
        return add_sampled_lora(
            result,
            x,
            lora_a.weight,
            lora_b.weight,
            module.scaling[active_adapter],
            std=std,
            factor=spec.factor,
            flipout=spec.flipout,
            eps=eps,
            b_bias=lora_b.bias,
        )


class Linear(BayesLoraLayer, LoraLinear):
    """Bayesian LoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    def __repr__(self) -> str:
        return "bayeslora." + super().__repr__()


# bitsandbytes is a core dependency; PEFT's bnb LoRA layers exist when it imports.
if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    class Linear8bitLt(BayesLoraLayer, LoraLinear8bitLt):
        """Bayesian LoRA beside a bitsandbytes int8 layer: base product through bitsandbytes, adapter in its dtype."""

        def __repr__(self) -> str:
            return "bayeslora." + super().__repr__()


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class Linear4bit(BayesLoraLayer, LoraLinear4bit):
        """Bayesian LoRA beside a bitsandbytes 4-bit (NF4 / FP4) layer: the quantized weight is never touched."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # PEFT's 4-bit forward copies the base output (a tokens x d_out temporary per layer) before adding the
            # adapters; the fused path adds into the bitsandbytes output buffer in place, through an autograd
            # Function that marks it dirty, so the plain case skips that copy. Anything else goes to PEFT.
            if self.disable_adapters or self.merged or "adapter_names" in kwargs or "alora_offsets" in kwargs:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                if name in self.lora_A:
                    result = BayesLoraVariant.forward(self, active_adapter=name, x=x, result=result)
            return result

        def __repr__(self) -> str:
            return "bayeslora." + super().__repr__()


def layer_class_for(base_layer: nn.Module) -> type[BayesLoraLayer]:
    """The Bayesian LoRA class for a base layer: bitsandbytes 4-bit / 8-bit first (they subclass nn.Linear)."""
    if is_bnb_4bit_available():
        import bitsandbytes as bnb

        if isinstance(base_layer, bnb.nn.Linear4bit):
            return Linear4bit
    if is_bnb_available():
        import bitsandbytes as bnb

        if isinstance(base_layer, bnb.nn.Linear8bitLt):
            return Linear8bitLt
    if isinstance(base_layer, (nn.Linear, Conv1D)):
        return Linear
    raise TypeError(
        f"bayeslora attaches to nn.Linear, transformers' Conv1D and bitsandbytes Linear8bitLt / Linear4bit layers, "
        f"not {type(base_layer).__name__}"
    )
