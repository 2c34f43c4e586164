"""``--adapter_name`` → a PEFT config. Every method the scripts offer is one entry of ``ADAPTERS``.

Later tuner types of this package join by adding an entry (``register_adapter``); nothing else in the scripts
branches on the adapter name.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)

from peft_bayes.arguments import comma_list, str2bool
from peft_bayes.errors import InputError, did_you_mean
from peft_bayes.io import read_json
from peft_bayes.options import option_values
from peft_bayes.tuners import BayesLoraConfig, BottleneckConfig, ParallelAdapterConfig
from peft_bayes.tuners.adapter_mlp import parse_scaling
from peft_bayes.tuners.bottleneck import MLP_INPUT_PROJECTIONS, PRESETS
from peft_bayes.tuners.parallel import SCALED_PARALLEL_SCALING

TASK = "CAUSAL_LM"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterSpec:
    """How one ``--adapter_name`` value becomes a PEFT config.

    Attributes:
        build: ``build(args, model_type, total_steps) -> PeftConfig``; ``args`` is the parsed train.py namespace.
        description: One line for ``--help`` and the README.
        peft_type: The ``peft_type`` of the configs it builds (PEFT's enum value, or our registered string).
        prompt_learning: Virtual-token methods (no target modules; no gradient checkpointing for prefix tuning).
        targets_table: Default target modules per model type, where they are not the tuner's own
            ``target_module_mapping`` (IA3 keeps its table elsewhere; bottleneck presets have one each).
        also_builds: Other ``peft_type`` values a flag can switch it to (``bottleneck --use_parallel_adapter``).
        quantized_ok: Works on bitsandbytes 4-bit / 8-bit base layers (PEFT's LoHa and LoKr do not).
        checkpointing_ok: Works with gradient checkpointing (PEFT's prefix tuning does not).
        bayesian: Trains a posterior with a KL term (BayesLoRA): the Bayesian LoRA flags apply.
    """

    build: Callable[[argparse.Namespace, str, int], PeftConfig]
    description: str
    peft_type: str
    prompt_learning: bool = False
    targets_table: dict[str, list[str]] | None = None
    also_builds: tuple[str, ...] = ()
    quantized_ok: bool = True
    checkpointing_ok: bool = True
    bayesian: bool = False


def _targets(args: argparse.Namespace) -> list[str] | None:
    # None lets PEFT pick its per-architecture default (see default_target_modules).
    return list(args.target_modules) if args.target_modules else None


# Model types whose default targets are transformers' Conv1D (weight stored in x out): PEFT's LoRA / AdaLoRA / IA3
# need fan_in_fan_out=True there (PEFT corrects a False per module, with a warning each time).
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


def _lora_fields(args) -> dict:
    return dict(
        task_type=TASK,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=_targets(args),
        bias="none",
    )


def _lora(args, model_type, total_steps, **extra) -> LoraConfig:
    return LoraConfig(**_lora_fields(args), fan_in_fan_out=model_type in CONV1D_MODEL_TYPES, **extra)


def _bayeslora(args, model_type, total_steps) -> BayesLoraConfig:
    return BayesLoraConfig(**_lora_fields(args), **option_values(BayesLoraConfig, args))


def _adalora(args, model_type, total_steps) -> AdaLoraConfig:
    # AdaLoRA starts at init_r and prunes to target_r = --lora_r over the run (PEFT's defaults: 12 -> 8).
    return AdaLoraConfig(
        task_type=TASK,
        target_r=args.lora_r,
        init_r=max(args.lora_r, round(1.5 * args.lora_r)),
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=_targets(args),
        total_step=max(total_steps, 1),
        fan_in_fan_out=model_type in CONV1D_MODEL_TYPES,
    )


def _ia3(args, model_type, total_steps) -> IA3Config:
    targets, fan_in_fan_out = _targets(args), model_type in CONV1D_MODEL_TYPES
    if targets is None:
        return IA3Config(task_type=TASK, fan_in_fan_out=fan_in_fan_out)
    # With explicit targets, the feed-forward ones (scaled on their input) are those in PEFT's default list.
    ff_default = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    feedforward = [t for t in targets if t in ff_default]
    return IA3Config(
        task_type=TASK, target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=fan_in_fan_out
    )


def _lycoris(config_cls):
    """LoHa / LoKr: same knobs (rank, alpha, module dropout), different factorisation of the update."""

    def build(args, model_type, total_steps):
        return config_cls(
            task_type=TASK,
            r=args.lora_r,
            alpha=args.lora_alpha,
            module_dropout=args.lora_dropout,
            target_modules=_targets(args),
        )

    return build


def _oft(args, model_type, total_steps) -> OFTConfig:
    return OFTConfig(
        task_type=TASK,
        r=0,
        oft_block_size=args.oft_block_size,
        module_dropout=args.lora_dropout,
        target_modules=_targets(args),
    )


def _prefix(args, model_type, total_steps) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type=TASK, num_virtual_tokens=args.num_virtual_tokens)


def _prompt(args, model_type, total_steps) -> PromptTuningConfig:
    return PromptTuningConfig(task_type=TASK, num_virtual_tokens=args.num_virtual_tokens)


def _ptuning(args, model_type, total_steps) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        task_type=TASK, num_virtual_tokens=args.num_virtual_tokens, encoder_hidden_size=args.encoder_hidden_size
    )


def _adapter_mlp_fields(args: argparse.Namespace, default_scaling: float = 1.0) -> dict:
    return dict(
        task_type=TASK,
        target_modules=_targets(args),
        bottleneck_size=args.bottleneck_size,
        non_linearity=args.non_linearity,
        adapter_dropout=args.adapter_dropout,
        scaling=default_scaling if args.scaling is None else args.scaling,
        init_weights={"identity": True, "bert": "bert"}[args.adapter_init],
    )


def _parallel(default_scaling: float):
    def build(args, model_type, total_steps) -> ParallelAdapterConfig:
        return ParallelAdapterConfig(**_adapter_mlp_fields(args, default_scaling))

    return build


def _is_mlp_input(target: str, model_type: str) -> bool:
    names = MLP_INPUT_PROJECTIONS.get(model_type, [])
    return any(target == n or n.endswith("." + target) or target.endswith("." + n) for n in names)


def _bottleneck(preset: str):
    """``adapterh`` / ``adapterp``: the papers' placements. ``bottleneck``: LLM-Adapters' flags and placement: its
    ``--use_adapterp`` / ``--use_parallel_adapter`` switches, and an adapter on the *input* of MLP input projections
    (LLaMA gate_proj/up_proj, fc1, fc_in, dense_h_to_4h, c_fc) among the targets, on the output of the others."""

    def build(args, model_type, total_steps) -> PeftConfig:
        if preset != "llm-adapters" or not (args.use_parallel_adapter or args.use_adapterp):
            return _sequential(args, model_type, preset)
        if args.use_parallel_adapter and args.use_adapterp:
            raise ValueError("--use_parallel_adapter and --use_adapterp exclude each other")
        if args.use_parallel_adapter:
            return _parallel(1.0)(args, model_type, total_steps)
        return _sequential(args, model_type, "adapterp")

    return build


def _sequential(args, model_type: str, preset: str) -> BottleneckConfig:
    targets = _targets(args)
    input_side = None
    if preset == "llm-adapters" and targets:
        input_side = [t for t in targets if _is_mlp_input(t, model_type)] or None
    return BottleneckConfig(preset=preset, input_side_modules=input_side, **_adapter_mlp_fields(args))


ADAPTERS: dict[str, AdapterSpec] = {
    "lora": AdapterSpec(_lora, "LoRA (Hu et al. 2021): W + (alpha/r) B A", "LORA"),
    "bayeslora": AdapterSpec(
        _bayeslora,
        "Bayesian LoRA (BLoB): Gaussian posterior over A learned by backprop, KL added to the loss",
        "BAYESLORA",
        bayesian=True,
    ),
    "dora": AdapterSpec(lambda a, m, t: _lora(a, m, t, use_dora=True), "DoRA: LoRA with a learned magnitude", "LORA"),
    "adalora": AdapterSpec(_adalora, "AdaLoRA: SVD-form LoRA whose rank budget is pruned to --lora_r", "ADALORA"),
    "ia3": AdapterSpec(
        _ia3,
        "IA3: learned rescaling of keys, values and feed-forward inputs",
        "IA3",
        targets_table=TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    ),
    "loha": AdapterSpec(
        _lycoris(LoHaConfig), "LoHa: Hadamard product of two low-rank updates", "LOHA", quantized_ok=False
    ),
    "lokr": AdapterSpec(_lycoris(LoKrConfig), "LoKr: Kronecker-product update", "LOKR", quantized_ok=False),
    "oft": AdapterSpec(_oft, "OFT: block-diagonal orthogonal rotation of the weights (--oft_block_size)", "OFT"),
    "prefix-tuning": AdapterSpec(
        _prefix, "prefix tuning: learned key/value prefixes", "PREFIX_TUNING", True, checkpointing_ok=False
    ),
    "prompt-tuning": AdapterSpec(_prompt, "prompt tuning: learned input embeddings", "PROMPT_TUNING", True),
    "p-tuning": AdapterSpec(_ptuning, "P-tuning: virtual tokens from a prompt encoder", "P_TUNING", True),
    "bottleneck": AdapterSpec(
        _bottleneck("llm-adapters"),
        "bottleneck adapters as LLM-Adapters runs them (--use_adapterp, --use_parallel_adapter switch placement)",
        "BOTTLENECK",
        targets_table=PRESETS["llm-adapters"],
        also_builds=("PARALLEL",),
    ),
    "adapterh": AdapterSpec(
        _bottleneck("adapterh"),
        "AdapterH (Houlsby et al.): bottleneck after attention output and MLP output projections",
        "BOTTLENECK",
        targets_table=PRESETS["adapterh"],
    ),
    "adapterp": AdapterSpec(
        _bottleneck("adapterp"),
        "AdapterP (Pfeiffer et al.): bottleneck after the MLP output projection",
        "BOTTLENECK",
        targets_table=PRESETS["adapterp"],
    ),
    "parallel": AdapterSpec(_parallel(1.0), "parallel adapter (He et al.): W x + s up(act(down(x)))", "PARALLEL"),
    "scaled_parallel": AdapterSpec(
        _parallel(SCALED_PARALLEL_SCALING), "scaled parallel adapter: parallel with s = 4 (He et al.)", "PARALLEL"
    ),
}


def _scaling_arg(value: str) -> float | str:
    try:
        return parse_scaling(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """train.py's adapter flags (LLM-Adapters' names and defaults): which adapter, its targets and sizes."""
    g = parser.add_argument_group("adapter")
    g.add_argument("--adapter_name", default="lora", help="one of: " + ", ".join(ADAPTERS))
    g.add_argument(
        "--target_modules",
        type=comma_list,
        default=None,
        help="comma-separated module names; default: per-architecture table (README)",
    )
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--oft_block_size", type=int, default=32)
    g.add_argument("--num_virtual_tokens", type=int, default=30)
    g.add_argument("--encoder_hidden_size", type=int, default=128, help="p-tuning prompt encoder width")
    g = parser.add_argument_group("bottleneck and parallel adapters")
    g.add_argument("--bottleneck_size", type=int, default=256, help="adapter hidden width")
    g.add_argument("--non_linearity", default="tanh", choices=["tanh", "relu", "gelu", "silu"])
    g.add_argument("--adapter_dropout", type=float, default=0.0)
    g.add_argument(
        "--scaling",
        type=_scaling_arg,
        default=None,
        help="output factor s: a number or 'learned' (default 1; 4 for scaled_parallel)",
    )
    g.add_argument(
        "--adapter_init",
        default="identity",
        choices=["identity", "bert"],
        help="identity: up-projection zero (starts at the base model); bert: N(0, 0.02) as LLM-Adapters",
    )
    switch = {"type": str2bool, "nargs": "?", "const": True, "default": False}
    g.add_argument("--use_parallel_adapter", **switch, help="bottleneck: parallel")
    g.add_argument("--use_adapterp", **switch, help="bottleneck: AdapterP")


def check_adapter_args(args: argparse.Namespace) -> None:
    """One-line errors for adapter flags that do not fit ``--adapter_name``: a quantized base or gradient
    checkpointing where the method cannot take them, BayesLoRA's flags changed for another adapter, bottleneck's
    switches elsewhere."""
    spec = adapter_spec(args.adapter_name)
    if (args.load_4bit or args.load_8bit) and not spec.quantized_ok:
        raise InputError(f"--adapter_name {args.adapter_name} does not support a quantized base (--load_4bit/8bit)")
    if args.use_gradient_checkpointing and not spec.checkpointing_ok:
        raise InputError(f"--adapter_name {args.adapter_name} cannot be combined with --use_gradient_checkpointing")
    for flag in ("use_parallel_adapter", "use_adapterp"):
        if getattr(args, flag) and args.adapter_name.lower() != "bottleneck":
            raise InputError(f"--{flag} applies to --adapter_name bottleneck only (got {args.adapter_name})")


def register_adapter(name: str, spec: AdapterSpec) -> None:
    """Adds an ``--adapter_name`` choice (used by this package's own tuner types)."""
    if name in ADAPTERS and ADAPTERS[name] is not spec:
        raise KeyError(f"--adapter_name {name!r} is already defined")
    ADAPTERS[name] = spec


def adapter_spec(name: str) -> AdapterSpec:
    key = name.lower()
    if key not in ADAPTERS:
        raise InputError(
            f"unknown --adapter_name {name!r}{did_you_mean(key, ADAPTERS)}; expected one of: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[key]


def read_adapter_config(folder: str) -> dict:
    """The ``adapter_config.json`` of an adapter folder; a one-line error when it cannot be read or is not a PEFT
    config (no ``peft_type``)."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        config = read_json(path)
    except OSError as err:
        raise InputError(f"--adapter {folder!r}: cannot read {ADAPTER_CONFIG} ({err})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise InputError(f"{path}: not a PEFT adapter config (no peft_type)")
    return config


def saved_peft_type(folder: str | None) -> str | None:
    """The ``peft_type`` (upper case) an adapter folder's config records; None without a readable one."""
    try:
        return str(read_adapter_config(folder)["peft_type"]).upper() if folder else None
    except InputError:
        return None  # loading the adapter reports it


def check_saved_adapter(adapter_name: str, folder: str) -> None:
    """Checks that the adapter saved in ``folder`` is of the kind ``--adapter_name`` names (evaluate/generate)."""
    spec = adapter_spec(adapter_name)
    found = read_adapter_config(folder)["peft_type"]
    if found not in (spec.peft_type, *spec.also_builds):
        raise InputError(f"--adapter {folder!r} holds a {found} adapter, not --adapter_name {adapter_name}")


def build_peft_config(args: argparse.Namespace, model_type: str, total_steps: int = 1) -> PeftConfig:
    """The PEFT config for ``args.adapter_name`` on a model of ``model_type`` (``config.model_type``)."""
    spec = adapter_spec(args.adapter_name)
    try:
        return spec.build(args, model_type, total_steps)
    except (ValueError, TypeError) as err:
        raise InputError(f"--adapter_name {args.adapter_name}: {str(err).splitlines()[0]}") from None


def default_target_modules(adapter_name: str, model_type: str) -> list[str] | None:
    """The modules an adapter targets on ``model_type`` when ``--target_modules`` is not given.

    These are the tuner's own per-architecture table (``target_module_mapping``), which PEFT applies itself.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    spec = adapter_spec(adapter_name)
    if spec.prompt_learning:
        return None
    table = spec.targets_table or getattr(PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type], "target_module_mapping", {})
    found = table.get(model_type)
    return list(found) if found is not None else None


def attach_adapter(model, peft_config: PeftConfig):
    """``get_peft_model`` with PEFT's multi-line errors (targets that match nothing, ...) as one-line InputErrors."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except TypeError as err:  # PEFT's "Target module ... is not supported" for layer types a method lacks
        raise InputError(f"this adapter cannot wrap this model's layers: {' '.join(str(err).split())[:300]}") from None
    except ValueError as err:
        msg = " ".join(str(err).split())
        if "not found in the base model" in msg or "target_modules" in msg.lower():
            targets = sorted(peft_config.target_modules) if peft_config.target_modules else None
            raise InputError(f"--target_modules {targets} match no module of this model: {msg[:300]}") from None
        raise InputError(f"could not attach the adapter: {msg[:300]}") from None
