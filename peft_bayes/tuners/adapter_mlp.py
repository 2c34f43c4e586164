"""What bottleneck and parallel adapters share: a small MLP ``s * up(act(down(drop(.))))`` beside a frozen layer.

The two tuners differ only in where that MLP reads and writes:

- sequential (``bottleneck``): ``h = W x``, then ``h + s * f(h)`` (on the layer's output), or ``x + s * f(x)`` fed
  into ``W`` (on its input, as LLM-Adapters does for MLP input projections);
- parallel (``parallel``): ``W x + s * f(x)``.

Both are non-linear in the adapter weights, so neither can be merged into ``W``. The MLP never touches ``W``: it
works the same beside ``nn.Linear``, GPT-2's ``Conv1D`` and bitsandbytes' ``Linear8bitLt`` / ``Linear4bit``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

# LLM-Adapters' default init ("bert"): both projections ~ N(0, 0.02), so the adapted model starts off the base.
BERT_INIT_STD = 0.02


@dataclass
class AdapterMLPConfig(PeftConfig):
    """Fields shared by [`BottleneckConfig`] and [`ParallelAdapterConfig`]."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match, e.g. ['down_proj']) or one regex (full match) to put adapters on. "
            "None: the tuner's per-architecture default (see the README)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave alone even if they match target_modules."}
    )
    bottleneck_size: int = field(default=256, metadata={"help": "Width of the adapter's hidden layer."})
    non_linearity: str = field(
        default="tanh", metadata={"help": "Activation between the projections: tanh, relu, gelu or silu."}
    )
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    scaling: float | str = field(
        default=1.0,
        metadata={"help": "Factor s on the adapter's output: a number or 'learned' (a trainable scalar from 1)."},
    )
    init_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True: down-projection Kaiming-uniform, up-projection zero: the model starts equal to the base. "
            "'bert': both ~ N(0, 0.02) (LLM-Adapters' default). False: both Kaiming-uniform (random, for tests)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. a classifier head) to train and save in full."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.non_linearity not in ACT2FN:
            raise ValueError(f"non_linearity {self.non_linearity!r} is unknown; use tanh, relu, gelu or silu")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        self.scaling = parse_scaling(self.scaling)
        if self.init_weights not in (True, False, "bert"):
            raise ValueError(f"init_weights must be True, False or 'bert', got {self.init_weights!r}")


def parse_scaling(value: float | int | str) -> float | str:
    """``1``, ``"4.0"`` → a float; ``"learned"`` stays; anything else is an error."""
    if isinstance(value, str) and value.strip().lower() == "learned":
        return "learned"
    try:
        scaling = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scaling must be a number or 'learned', got {value!r}") from None
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {value!r}")
    return scaling


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear-like layer: ``nn.Linear`` (bitsandbytes' 8-bit and 4-bit layers subclass it), GPT-2's
    ``Conv1D`` (weight stored as in x out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(
        f"adapters attach to nn.Linear, transformers' Conv1D or bitsandbytes Linear8bitLt/Linear4bit layers, "
        f"not {type(layer).__name__}"
    )


class AdapterMLPLayer(nn.Module, BaseTunerLayer):
    """A frozen Linear-like layer with, per adapter name, the MLP ``s * up(act(down(dropout(h))))``.

    As in PEFT's own tuners (``lora_A[name]``), each piece of an adapter sits in its own container keyed by the
    adapter name, whose attribute name starts with the tuner prefix ``p``: ``{p}down[name]`` and ``{p}up[name]``
    (bias-free ``nn.Linear``, as in LLM-Adapters), ``{p}scale[name]`` (``learned`` scaling only),
    ``{p}dropout[name]``, ``{p}act[name]`` and ``{p}scaling[name]`` (the config's value). A weight's state-dict key
    thus ends in ``{p}down.<name>.weight`` and the learned scale's in ``{p}scale.<name>``: the adapter name second to
    last or last, where PEFT strips it on saving and puts the loading adapter's name back. Checkpoints are therefore
    independent of the name the adapter had (``q_proj.parallel_down.weight``).

    Subclasses set ``prefix``, list the containers in ``adapter_layer_names`` / ``other_param_names`` (checked at
    class creation) and define ``adapter_shape`` and ``adapted_forward``.
    """

    prefix: str = ""
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        p = cls.prefix
        expected = (f"{p}down", f"{p}up", f"{p}scale"), (f"{p}dropout", f"{p}act", f"{p}scaling")
        if (cls.adapter_layer_names, cls.other_param_names[:3]) != expected:
            names = f"adapter_layer_names must be {expected[0]}, other_param_names start with {expected[1]}"
            raise TypeError(f"{cls.__name__}: {names}")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        p = self.prefix
        setattr(self, f"{p}down", nn.ModuleDict())
        setattr(self, f"{p}up", nn.ModuleDict())
        setattr(self, f"{p}scale", nn.ParameterDict())
        setattr(self, f"{p}dropout", nn.ModuleDict())
        setattr(self, f"{p}act", nn.ModuleDict())
        setattr(self, f"{p}scaling", {})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = in_out_features(self.get_base_layer())

    # The containers under tuner-independent names, for the shared code below and for tests.
    @property
    def adapter_down(self) -> nn.ModuleDict:
        return getattr(self, f"{self.prefix}down")

    @property
    def adapter_up(self) -> nn.ModuleDict:
        return getattr(self, f"{self.prefix}up")

    @property
    def adapter_scale(self) -> nn.ParameterDict:
        return getattr(self, f"{self.prefix}scale")

    @property
    def adapter_dropout(self) -> nn.ModuleDict:
        return getattr(self, f"{self.prefix}dropout")

    @property
    def adapter_act(self) -> nn.ModuleDict:
        return getattr(self, f"{self.prefix}act")

    @property
    def adapter_scaling(self) -> dict[str, float | str]:
        return getattr(self, f"{self.prefix}scaling")

    def adapter_shape(self, adapter_name: str) -> tuple[int, int]:
        """(in, out) of the adapter's MLP for this layer."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: AdapterMLPConfig, **kwargs: Any) -> None:
        d_in, d_out = self.adapter_shape(adapter_name)
        p = config.adapter_dropout
        self.adapter_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.adapter_act[adapter_name] = ACT2FN[config.non_linearity]
        self.adapter_down[adapter_name] = nn.Linear(d_in, config.bottleneck_size, bias=False)
        self.adapter_up[adapter_name] = nn.Linear(config.bottleneck_size, d_out, bias=False)
        self.adapter_scaling[adapter_name] = config.scaling
        if config.scaling == "learned":
            self.adapter_scale[adapter_name] = nn.Parameter(torch.ones(1))
        self.reset_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        down, up = self.adapter_down[adapter_name].weight, self.adapter_up[adapter_name].weight
        if init_weights == "bert":
            nn.init.normal_(down, std=BERT_INIT_STD)
            nn.init.normal_(up, std=BERT_INIT_STD)
            return
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        if init_weights is True:
            nn.init.zeros_(up)  # f(h) = 0 at the start: the adapted model equals the base
        else:
            nn.init.kaiming_uniform_(up, a=math.sqrt(5))

    def adapter_mlp(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``s * up(act(down(dropout(h))))``: (..., in) -> (..., out) for one adapter."""
        down = self.adapter_down[adapter_name]
        # The adapter keeps its own dtype (fp32 beside a bf16 or 4-bit base: PEFT upcasts adapter weights); the
        # result goes back to the dtype of the stream it is added to.
        z = self.adapter_dropout[adapter_name](h.to(down.weight.dtype))
        z = self.adapter_up[adapter_name](self.adapter_act[adapter_name](down(z)))
        scaling = self.adapter_scaling[adapter_name]
        scale = self.adapter_scale[adapter_name] if scaling == "learned" else scaling
        return (z * scale).to(h.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"{type(self).__name__}: adapters with a non-linearity cannot be merged into the base weights; "
            "keep the PeftModel, or call unload() to get the base model back without them"
        )

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.adapter_down]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, active, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


def module_matches(pattern: list[str] | set[str] | str | None, key: str) -> bool:
    """Whether module ``key`` is named by ``pattern``, with ``target_modules``' rules: a string is a regex that must
    match the whole key, a list names modules by suffix (``"mlp.c_proj"`` matches ``"h.0.mlp.c_proj"``)."""
    if not pattern:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return any(key == name or key.endswith("." + name) for name in pattern)


class AdapterMLPModel(BaseTuner):
    """The tuner half both adapter types share: wrap each target, never merge."""

    def layer_kwargs(self, config: AdapterMLPConfig, current_key: str) -> dict:
        """Extra per-module arguments for the layer (e.g. which side a sequential adapter sits on)."""
        return {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        kwargs = self.layer_kwargs(config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # PEFT's load hook (set_peft_model_state_dict). Checkpoints of earlier peft_bayes versions, before the
        # per-tensor layout, held one module per adapter: "<layer>.<prefix>adapter.<name>.down.weight" (and
        # .up.weight), the name it was saved under left in, and "<layer>.<prefix>adapter.scale" (learned scaling;
        # PEFT had stripped the name there). They become today's "<layer>.<prefix>down.weight", ...; PEFT then
        # inserts the loading adapter's name.
        legacy = re.compile(rf"\.{re.escape(cls.prefix)}adapter\.(?:[^.]+\.)?(down\.weight|up\.weight|scale)$")
        state_dict = {legacy.sub(lambda m: f".{cls.prefix}{m[1]}", k): v for k, v in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _check_merge_allowed(self):
        raise ValueError(
            f"{self.prefix.rstrip('_')} adapters are non-linear (up(act(down(.)))) and cannot be merged into the "
            "base weights; use unload() to get the base model back, or keep the PeftModel for inference"
        )
