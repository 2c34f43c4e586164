"""N posterior draws of a LoRA-family adapter in one batch: row i of the batch runs with draw i's weights.

A posterior's ``passes`` hold one draw at a time (a context per pass). For generation and teacher forcing, running
the N draws one after the other costs N model calls; when every draw is a value of the LoRA factors (Laplace, SWAG,
MultiSWAG, TFB, ensemble members, BayesLoRA's ``pass`` draws), the draws are read off the passes once
(``capture``) and applied together (``row_weights``): each active ``lora_A`` / ``lora_B`` computes its rows with
their own draw, so one ``generate`` call or one forward serves all of them. Posteriors whose draws are not weight
values (MC dropout's masks, BayesLoRA's fresh per-forward draws) and adapters whose draws touch other weights run
the passes one after the other (``DrawSet.batched`` is False), with the same results a pass-by-pass evaluation gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peft_bayes.errors import InputError
from peft_bayes.posterior.likelihood import takes_logits_to_keep

Factors = dict[tuple[str, str], torch.Tensor]  # (LoRA layer's module name, "A" | "B") -> effective weight


def _lora_layers(model) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _active(layer) -> str | None:
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    return names[0] if len(names) == 1 else None


def effective_factors(model) -> Factors:
    """The weights the active LoRA factors multiply with now: a BayesLoRA factor inside ``posterior_sample`` is its
    fixed draw M + σ·E, every other factor its weight (copies)."""
    out: Factors = {}
    for name, layer in _lora_layers(model):
        adapter = _active(layer)
        if adapter is None:
            continue
        a, b = layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone()
        fixed = getattr(layer, "bayeslora_fixed_eps", {}).get(adapter)
        if fixed is not None:
            drawn = layer.bayes_factor(adapter).weight.detach() + layer.posterior_std(adapter).detach() * fixed
            a, b = (drawn, b) if layer.bayeslora_spec[adapter].factor == "A" else (a, drawn)
        out[(name, "A")], out[(name, "B")] = a, b
    return out


def _other_state(model) -> list[torch.Tensor]:
    """Adapter weights outside the LoRA factors (trained copies of whole modules, biases): a draw that changes them
    cannot be applied row by row."""
    return [p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n or "lora_bias" in n]


def _forward_changed(model, hooks: int) -> bool:
    """Whether a pass changes the forward itself: a dropout module in training mode, hooks added (MC dropout's
    masks) or BayesLoRA sampling every forward."""
    if any(m.training for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0):
        return True
    return _hook_count(model) != hooks or any(getattr(m, "bayeslora_mode", None) for _, m in _lora_layers(model))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def capture(posterior, n: int, seed: int) -> list[Factors] | None:
    """The LoRA factors of the posterior's ``n`` passes, or None when they are not all a change of those factors
    (dropout active, fresh draws per forward, other adapter weights changed, several active adapters)."""
    model = posterior.model
    if not _lora_layers(model):
        return None
    reference, hooks = _other_state(model), _hook_count(model)
    draws = []
    for context, _ in posterior.passes(n, seed):
        with context:
            if _forward_changed(model, hooks):
                return None
            if any(not torch.equal(a, b) for a, b in zip(_other_state(model), reference)):
                return None
            factors = effective_factors(model)
        if not factors:
            return None
        draws.append(factors)
    return draws


def _row_forward(module: nn.Linear, weights: torch.Tensor):
    """A forward of ``module`` in which batch row group i (of ``weights.shape[0]`` equal groups) uses weights[i]."""
    bias = module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = weights.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of the {n} draws")
        w = weights.to(dtype=x.dtype, device=x.device)
        y = torch.bmm(x.reshape(n, -1, x.shape[-1]), w.transpose(1, 2))
        y = y.reshape(*x.shape[:-1], w.shape[1])
        return y if bias is None else y + bias

    return forward


@contextlib.contextmanager
def row_weights(model, draws: list[Factors]) -> Iterator[None]:
    """Context in which batch row group i (the batch split into ``len(draws)`` equal consecutive groups) runs with
    the LoRA factors of ``draws[i]``; the modules' own forwards are back on exit."""
    modules = dict(model.named_modules())
    patched = []
    try:
        for name, which in draws[0]:
            layer = modules[name]
            adapter = _active(layer)
            if adapter is None:
                raise InputError(f"{name}: the draws need exactly one active adapter")
            linear = (layer.lora_A if which == "A" else layer.lora_B)[adapter]
            stacked = torch.stack([d[(name, which)] for d in draws])
            linear.forward = _row_forward(linear, stacked)
            patched.append(linear)
        yield
    finally:
        for linear in patched:
            del linear.forward  # the instance attribute goes; the class's forward is back


def main_context(posterior) -> contextlib.AbstractContextManager:
    """The context of the main answer: the posterior's mean weights, or its first pass where it has none (an
    ensemble's first member)."""
    try:
        return posterior.mean()
    except InputError:
        return next(iter(posterior.passes(1, 0)))[0]


class DrawSet:
    """``n`` draws of ``posterior`` (seeded by ``seed``), run in one batch where they are weight values
    (``batched``), else pass by pass."""

    def __init__(self, posterior, n: int, seed: int) -> None:
        self.posterior, self.n, self.seed = posterior, n, seed
        self.draws = capture(posterior, n, seed) if n > 0 else None
        self.batched = self.draws is not None

    @contextlib.contextmanager
    def _all_rows(self) -> Iterator[None]:
        with main_context(self.posterior), row_weights(self.posterior.model, self.draws):
            yield

    def _contexts(self) -> list:
        """One context for all draws (``batched``), else one per pass."""
        if self.batched:
            return [self._all_rows()]
        return [context for context, _ in self.posterior.passes(self.n, self.seed)]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        """One generated continuation (token ids after the prompt) per draw, for a (1, T) prompt."""
        model, out = self.posterior.model, []
        contexts = self._contexts()
        rows = self.n if self.batched else 1
        for context in contexts:
            with context:
                ids = input_ids.expand(rows, -1)
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            out += [s[input_ids.shape[1] :] for s in seq]
        return out

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, n_answer: int) -> torch.Tensor:
        """(draws, n_answer, vocab) float32 logits that predict the last ``n_answer`` tokens of the (1, T) sequence
        ``input_ids`` under each draw (the mean's, as one draw, when ``n`` is 0)."""
        model = self.posterior.model
        if self.n == 0:
            contexts, rows = [main_context(self.posterior)], 1
        else:
            contexts, rows = self._contexts(), (self.n if self.batched else 1)
        keep = {"logits_to_keep": n_answer + 1} if takes_logits_to_keep(model) else {}
        out = []
        for context in contexts:
            with context:
                ids = input_ids.expand(rows, -1)
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **keep).logits
            out.append(logits[:, -n_answer - 1 : -1].float())
        return torch.cat(out)
