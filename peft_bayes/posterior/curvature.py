"""Where a Laplace posterior lives and how its curvature is collected: the adapter's weight matrices ("sites") and
forward hooks that record, per site, the input activations ``a`` and the outputs ``y`` of every forward pass.

Every adapter with weight matrices calls them as ``nn.Linear`` modules: LoRA's ``lora_A`` / ``lora_B`` (beside plain,
Conv1D, 8-bit and 4-bit bases), DoRA's low-rank factors, BayesLoRA's means (its mean pass is a plain LoRA), the
bottleneck and parallel adapters' ``down`` / ``up``. For a weight ``W`` (out, in) used as ``y = a Wᵀ`` the gradient
of a scalar ``s`` is ``Σ_t g_t a_tᵀ`` with ``g = ∂s/∂y``, so ``a`` (recorded on the forward) and ``g`` (one
``autograd.grad`` into the recorded outputs per backward vector) give every curvature structure:

- ``kron``: K-FAC, ``A = Σ a aᵀ`` and ``G = Σ g gᵀ`` over tokens (``expand``: tokens are examples; ``reduce``: each
  example's tokens summed first, Eschenhagen et al. 2023), never the (out·in)² matrix;
- ``diag`` / ``full``: exact per-example gradients ``Σ_t g_t a_tᵀ``, squared or outer-multiplied.

Statistics are accumulated in float32 (float64 for a float64 model) whatever the model dtype; padding tokens are
masked out of ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum


class Subset(OptionEnum):
    """Which adapter weights a Laplace posterior covers: ``all``, or the ``last_layer``'s (the adapters of the last
    adapted module)."""

    ALL = "all"
    LAST_LAYER = "last_layer"


@dataclass
class Site:
    """One adapter weight matrix in the posterior: ``name`` (module path + container, no adapter name)."""

    name: str
    module: nn.Linear

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)


def _active_adapter(model) -> str:
    names = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    if len(names) != 1 or names[0] is None:
        raise InputError(f"a Laplace posterior needs exactly one active adapter, the model has {names}")
    return names[0]


def adapter_sites(model, subset: str = "all") -> list[Site]:
    """The weight matrices of the active adapter of a ``PeftModel``, in module order.

    ``subset``: ``all``, or ``last_layer`` (the adapters of the last adapted module). Raises a one-line
    ``InputError`` for adapters without weight matrices (prefix, prompt, IA³, ...).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if subset not in Subset.values():
        raise InputError(f"subset must be one of {'/'.join(Subset.values())}, got {subset!r}")
    adapter = _active_adapter(model)
    layers: list[list[Site]] = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        sites = []
        for container in module.adapter_layer_names:
            held = getattr(module, container, None)
            if isinstance(held, nn.ModuleDict) and adapter in held and isinstance(held[adapter], nn.Linear):
                sites.append(Site(f"{name}.{container}", held[adapter]))
        if sites:
            layers.append(sites)
    if not layers:
        kind = getattr(getattr(model, "active_peft_config", None), "peft_type", type(model).__name__)
        kind = getattr(kind, "value", kind)
        raise InputError(
            f"a Laplace posterior needs an adapter with weight matrices (lora, dora, bayeslora, bottleneck, "
            f"parallel); adapter {adapter!r} is {kind}"
        )
    return layers[-1] if subset == "last_layer" else [s for sites in layers for s in sites]


def stats_dtype(sites: list[Site]) -> torch.dtype:
    """float32, or float64 when the adapter weights are float64."""
    return torch.promote_types(sites[0].weight.dtype, torch.float32)


class Recorder:
    """Context manager: forward hooks that keep each site's (input, output) of the last forward pass, with the
    site weights requiring grad (restored on exit) so the outputs are part of the autograd graph."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.inputs: list[torch.Tensor | None] = [None] * len(sites)
        self.outputs: list[torch.Tensor | None] = [None] * len(sites)
        self._handles: list = []
        self._requires: list[bool] = []

    def _hook(self, index: int):
        def hook(module, args, output):
            self.inputs[index] = args[0].detach()
            self.outputs[index] = output

        return hook

    def __enter__(self) -> Recorder:
        self._requires = [s.weight.requires_grad for s in self.sites]
        for site in self.sites:
            site.weight.requires_grad_(True)
        self._handles = [s.module.register_forward_hook(self._hook(i)) for i, s in enumerate(self.sites)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for site, flag in zip(self.sites, self._requires):
            site.weight.requires_grad_(flag)
        self.inputs = [None] * len(self.sites)
        self.outputs = [None] * len(self.sites)

    def check_recorded(self) -> None:
        missing = [s.name for s, y in zip(self.sites, self.outputs) if y is None]
        if missing:
            raise RuntimeError(f"the forward pass did not call the adapter weights {missing[:3]}")

    def output_grads(self, f: torch.Tensor, vector: torch.Tensor) -> list[torch.Tensor]:
        """``∂(f · vector)/∂y`` for every site's recorded output (zeros where ``f`` does not depend on it)."""
        self.check_recorded()
        grads = torch.autograd.grad(
            f, self.outputs, grad_outputs=vector.to(f.dtype), retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(y) if g is None else g for g, y in zip(grads, self.outputs)]


def rows_tokens(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, tokens, features) view of a site tensor whose leading dimensions are (rows, tokens...)."""
    return t.reshape(rows, -1, t.shape[-1])


def per_unit_gradients(
    a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, n_units: int, dtype: torch.dtype
) -> torch.Tensor:
    """(n_units, out, in) exact gradients ``Σ_t g_t a_tᵀ`` of each unit (example) over its rows and tokens.

    a: (R, T, in), g: (R, T, out), mask: (R, T) real tokens, unit: (R,) the unit of each row.
    """
    a = a.to(dtype) * mask[..., None].to(dtype)
    per_row = torch.einsum("rto,rti->roi", g.to(dtype), a)
    out = per_row.new_zeros((n_units, *per_row.shape[1:]))
    return out.index_add_(0, unit.to(out.device), per_row)
