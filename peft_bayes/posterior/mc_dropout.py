"""MC dropout (Gal & Ghahramani 2016): the adapter's dropout kept on at evaluation.

Two kinds of sample (``mask``):

- ``feature`` (default): one Bernoulli mask per dropout module of the active adapter, over the dropout's input
  features: ``(d_in,)`` with values 0 or ``1 / (1 - p)``, shared by every token and example of the pass. Dropping
  input feature j of a LoRA layer is dropping column j of ``lora_A`` (of the bottleneck's down projection): each mask
  is a sample of the adapter's weights, so batched scores equal one-at-a-time scores and a pass is reproducible from
  its seed alone, whatever the batch size.
- ``element``: what the authors' code does (bayesian-peft's and swag-lora's MC dropout leave the dropout modules in
  train mode): a fresh mask per element of the dropout's input (token x feature) on every forward pass, as in
  training. A pass is still reproducible from its seed for the same batches (each module draws from its own seeded
  generator), but a score depends on the batch it was computed in.

The masks are applied by forward hooks on the dropout modules (PEFT LoRA's ``lora_dropout[adapter]``, our adapters'
``<prefix>dropout[adapter]``): the hook replaces the module's output by ``input * mask``, in train or eval mode
alike, and is removed when the pass ends.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum, add_option_flags, coerce_enums, flags_of, option, options_from_args, require
from peft_bayes.posterior.base import Posterior


def feature_mask(width: int, rate: float, seed: int) -> torch.Tensor:
    """(width,) float64 inverted-dropout mask drawn from ``seed``: 0 with probability ``rate``, else 1 / (1 - rate)
    (cast to the input's dtype where it is applied)."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(width, generator=generator, dtype=torch.float64) >= rate
    return keep.to(torch.float64) / (1.0 - rate)


def module_seed(seed: int, index: int) -> int:
    """Seed of the mask of dropout module ``index`` in the pass drawn from ``seed`` (distinct pairs for index < 1e6+3);
    a mask depends on the pass and the module only, never on the order modules run in."""
    return (seed * 1_000_003 + index) % (1 << 63)


def dropout_modules(model) -> list[tuple[str, nn.Module]]:
    """(name, dropout module) of every adapter layer of the active adapter(s), in module order.

    Any PEFT tuner layer keeps its dropout per adapter in a ``ModuleDict`` listed in ``other_param_names`` whose name
    ends in ``dropout`` (LoRA's ``lora_dropout``, ``bottleneck_dropout``, ``parallel_dropout``); an ``nn.Identity``
    there is an adapter trained without dropout.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = getattr(model, "active_adapters", None)  # a PeftModel's list (transformers' models have a method)
    active = list(names) if isinstance(names, (list, tuple)) else []
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.other_param_names:
            held = getattr(module, attr, None)
            if not (attr.endswith("dropout") and isinstance(held, nn.ModuleDict)):
                continue
            for adapter in active:
                if adapter in held:
                    if adapter in getattr(module, "lora_variant", {}):  # DoRA & co. skip dropout in eval mode
                        raise InputError(
                            f"--posterior mc_dropout supports plain LoRA, not LoRA variants such as DoRA ({name})"
                        )
                    if getattr(module, "merged", False):
                        raise InputError(f"--posterior mc_dropout needs an unmerged adapter; {name} is merged")
                    found.append((f"{name}.{attr}.{adapter}", held[adapter]))
    return found


def module_rate(module: nn.Module) -> float:
    """The dropout rate of an adapter's dropout module (0 for ``nn.Identity``)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


class DropoutMask(OptionEnum):
    """What one MC-dropout sample draws (see the module docstring)."""

    FEATURE = "feature"
    ELEMENT = "element"


def element_mask(x: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """An inverted-dropout mask of ``x``'s shape, dtype and device: 0 with probability ``rate``, else 1 / (1 - p)."""
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= rate
    return keep.to(x.dtype) / (1.0 - rate)


class DropoutMasks:
    """Context of one MC-dropout pass: each dropout module multiplies its input by its mask.

    ``feature``: masks are drawn on a module's first call of the pass (its width is the input's last dimension) and
    kept in ``masks`` (module name -> (d_in,) mask) for the rest of the pass. ``element``: every call draws a fresh
    mask of the input's shape from the module's own generator, seeded from the pass's seed and the module's index.
    Leaving the context removes the hooks.
    """

    def __init__(self, model, modules: list[tuple[str, nn.Module, float]], seed: int, mask: str = "feature") -> None:
        self.model, self.modules, self.seed, self.mask = model, modules, seed, DropoutMask(mask)
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, index: int, name: str, rate: float):
        if self.mask == "element":
            return self._element_hook(index, rate)
        cached: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> the mask there

        def hook(module, args, output):
            x = args[0]
            if name not in self.masks:
                self.masks[name] = feature_mask(x.shape[-1], rate, module_seed(self.seed, index))
            mask = self.masks[name]
            if mask.numel() != x.shape[-1]:
                raise RuntimeError(f"{name}: dropout input width {x.shape[-1]} changed within a pass ({mask.numel()})")
            key = (x.device, x.dtype)
            if key not in cached:
                cached[key] = mask.to(device=x.device, dtype=x.dtype)
            return x * cached[key]

        return hook

    def _element_hook(self, index: int, rate: float):
        generators: dict[torch.device, torch.Generator] = {}

        def hook(module, args, output):
            x = args[0]
            if rate == 0.0:
                return x
            if x.device not in generators:
                generators[x.device] = torch.Generator(device=x.device).manual_seed(module_seed(self.seed, index))
            return x * element_mask(x, rate, generators[x.device])

        return hook

    def __enter__(self):
        try:
            for index, (name, module, rate) in enumerate(self.modules):
                self._handles.append(module.register_forward_hook(self._hook(index, name, rate)))
        except BaseException:
            self._remove()
            raise
        return self.model

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class MCDropoutOptions:
    """Settings of MC dropout."""

    rate: float | None = option(
        None,
        "mc_dropout: the dropout rate of every adapter dropout module",
        flag="mc_dropout_rate",
        default_text="the adapter's own",
    )
    mask: DropoutMask = option(
        DropoutMask.FEATURE,
        "mc_dropout: feature = one mask over the input features per module, held for a pass (a weight sample); "
        "element = a fresh mask per element on every forward, as training draws it (the authors' code)",
        flag="mc_dropout_mask",
    )

    def __post_init__(self) -> None:
        coerce_enums(self)
        require(self.rate is None or 0.0 <= self.rate < 1.0, f"`rate` must be in [0, 1), got {self.rate}")


class MCDropout(Posterior):
    """MC dropout over the active adapter of a ``PeftModel`` (see the module docstring).

    Args:
        model: The ``PeftModel``.
        rate: Dropout rate of every adapter dropout module; None: each module's own (the rate the adapter was
            trained with), which must then be > 0 somewhere.
        mask: ``feature`` (one mask per module over the input features, held for a pass) or ``element`` (a fresh
            mask per element on every forward); see the module docstring.
    """

    name: ClassVar[str] = "mc_dropout"
    default_samples: ClassVar[int] = 10
    accepts: ClassVar[tuple[str, ...]] = tuple(flags_of(MCDropoutOptions))

    def __init__(self, model, rate: float | None = None, mask: str = "feature") -> None:
        super().__init__(model)
        self.mask = MCDropoutOptions(rate, mask).mask  # one-line errors for a rate outside [0, 1), an unknown mask
        found = dropout_modules(model)
        if not found:
            raise InputError(
                "--posterior mc_dropout needs an adapter with dropout modules (lora, bottleneck, parallel); "
                "this model's active adapter has none"
            )
        rates = [module_rate(m) if rate is None else float(rate) for _, m in found]
        if rate is None and max(rates) == 0.0:
            raise InputError(
                "--posterior mc_dropout needs an adapter trained with dropout (lora_dropout / adapter_dropout > 0); "
                "this one has none: retrain with dropout or give a rate explicitly"
            )
        self.rate = rate
        self.modules = [(n, m, r) for (n, m), r in zip(found, rates) if r > 0 or rate is not None]

    @property
    def rates(self) -> dict[str, float]:
        """Dropout rate per module name, as the samples use it."""
        return {n: r for n, _, r in self.modules}

    def mean(self) -> AbstractContextManager:
        """The adapter without dropout (in train mode too: every mask is all ones)."""
        return DropoutMasks(self.model, [(n, m, 0.0) for n, m, _ in self.modules], 0)

    def sample(self, seed: int) -> AbstractContextManager:
        """One pass's masks drawn from ``seed``: held per module (feature) or fresh on every forward (element)."""
        return DropoutMasks(self.model, self.modules, seed, self.mask)

    def config(self) -> dict:
        return {"rate": self.rate, "mask": str(self.mask)}

    # --- the scripts ---------------------------------------------------------------------------------------------
    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        if not training:
            add_option_flags(parser, MCDropoutOptions)

    @classmethod
    def check_args(cls, args) -> None:
        options_from_args(MCDropoutOptions, args)

    @classmethod
    def from_args(cls, work) -> MCDropout:
        options = options_from_args(MCDropoutOptions, work.args)
        return cls(work.model, rate=options.rate, mask=options.mask)

    def summary(self) -> dict:
        """Its settings and the rates in use (the adapter's own where no --mc_dropout_rate)."""
        return {"posterior": self.name, self.name: {**self.config(), "rates": sorted(set(self.rates.values()))}}

    @classmethod
    def from_config(cls, model, config: dict) -> MCDropout:
        return cls(model, config.get("rate"), config.get("mask", "feature"))
