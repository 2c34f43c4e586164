"""How Bayesian LoRA layers draw their weights, model-wide.

By default a layer samples in training mode (a fresh E, and flipout signs, every forward pass) and uses the
posterior mean in eval mode, so ``model.eval()`` + ``generate`` is deterministic. Two context managers override it:

- ``sampling(model, True / False)``: fresh draws every forward pass / the posterior mean, whatever the mode;
- ``posterior_sample(model, seed)``: one fixed draw of every Bayesian factor, ``W = M + sigma * E``, shared by every
  token and every forward inside the block. That is one posterior sample of the whole network: a generation keeps
  the same weights from the first to the last token, and the draw depends on ``seed`` only (not on the batch), so
  batched and one-at-a-time evaluation agree.
- ``fresh_draws(model, seed)``: BLoB's evaluation sample: a fresh E (and flipout signs per token) on every forward
  pass inside the block, from torch's generators seeded by ``seed`` (so a run is reproducible, but the draws depend
  on how the data is batched).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peft_bayes.tuners.bayeslora.layer import MEAN, SAMPLE, BayesLoraLayer


def bayes_layers(model: nn.Module) -> list[tuple[str, BayesLoraLayer]]:
    """(name, layer) of every Bayesian LoRA layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BayesLoraLayer)]


def _active(layer: BayesLoraLayer) -> list[str]:
    return [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.bayeslora_rho]


def is_bayesian(model: nn.Module) -> bool:
    """Whether ``model`` has a Bayesian LoRA layer with an active adapter (so sampling changes its outputs).

    Args:
        model: A ``PeftModel`` or any module holding Bayesian LoRA layers.

    Returns:
        True when at least one Bayesian LoRA layer has an active adapter.
    """
    return any(_active(layer) for _, layer in bayes_layers(model))


def set_sampling(model: nn.Module, enabled: bool | None) -> None:
    """True: fresh draws every forward; False: posterior mean; None: sample in training mode, mean in eval mode.

    Args:
        model: A ``PeftModel`` or any module holding Bayesian LoRA layers; every such layer is set.
        enabled: True, False or None, as above (None is the layers' default behaviour).
    """
    mode = None if enabled is None else (SAMPLE if enabled else MEAN)
    for _, layer in bayes_layers(model):
        layer.bayeslora_mode = mode


@contextmanager
def sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """``with sampling(model, False): ...`` runs the posterior mean (N = 0); ``True`` samples every forward.

    Args:
        model: A ``PeftModel`` or any module holding Bayesian LoRA layers.
        enabled: True: fresh draws every forward pass; False: the posterior mean. Each layer's previous mode is
            restored when the block ends.

    Returns:
        A context manager that yields ``model``.
    """
    layers = bayes_layers(model)
    before = [layer.bayeslora_mode for _, layer in layers]
    set_sampling(model, enabled)
    try:
        yield model
    finally:
        for (_, layer), mode in zip(layers, before):
            layer.bayeslora_mode = mode


def _layer_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def posterior_sample(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """Fixes one posterior draw of every active Bayesian factor for the duration of the block.

    The E of each layer comes from a CPU generator seeded by ``seed``, the layer's position and the adapter name, so
    the draw is the same on every device, for every batch, and whether the ``PeftModel`` or its base model is passed.

    Args:
        model: A ``PeftModel`` or any module holding Bayesian LoRA layers.
        seed: Seed of the draw: the same seed gives the same weights.

    Returns:
        A context manager that yields ``model``; the layers' earlier fixed draws are restored when the block ends.
    """
    layers = bayes_layers(model)
    before = [dict(layer.bayeslora_fixed_eps) for _, layer in layers]
    try:
        # Seeded by the layer's position among the Bayesian layers (not its name, which depends on whether the
        # PeftModel or its base model was passed) and the adapter name.
        for index, (_, layer) in enumerate(layers):
            for adapter in _active(layer):
                layer.draw_fixed_eps(adapter, torch.Generator().manual_seed(_layer_seed(seed, f"{index}/{adapter}")))
        yield model
    finally:
        for (_, layer), fixed in zip(layers, before):
            layer.bayeslora_fixed_eps = fixed


@contextmanager
def fresh_draws(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """Samples every forward pass inside the block (as in training: fresh E, flipout signs per token), with torch's
    CPU and CUDA generators forked and seeded by ``seed``; the generators' states are restored on exit."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with sampling(model, True):
            yield model


def kl_divergence(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Closed-form KL(q || p) summed over every Bayesian factor of ``adapter_name`` (default: the active adapters).

    Args:
        model: A ``PeftModel`` or any module holding Bayesian LoRA layers.
        adapter_name: The adapter whose factors are summed; None: the active adapters.

    Returns:
        A scalar float32 tensor on the adapter's device, differentiable in the means and ``bayeslora_rho``.

    Raises:
        ValueError: The model has no such Bayesian LoRA adapter.
    """
    total = None
    for _, layer in bayes_layers(model):
        names = [adapter_name] if adapter_name is not None else layer.active_adapters
        for name in names:
            if name in layer.bayeslora_rho:
                kl = layer.kl_divergence(name)
                total = kl if total is None else total + kl.to(total.device)
    if total is None:
        raise ValueError(f"the model has no Bayesian LoRA adapter {adapter_name or '(active)'}")
    return total
