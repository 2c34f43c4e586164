"""``--adapter_name`` → a PEFT config. Every method the scripts offer is one entry of ``ADAPTERS``.

Later tuner types of this package join by adding an entry (``register_adapter``); nothing else in the scripts
branches on the adapter name.
"""

from __future__ import annotations

import argparse
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

from peft_bayes.errors import InputError

TASK = "CAUSAL_LM"


@dataclass(frozen=True)
class AdapterSpec:
    """How one ``--adapter_name`` value becomes a PEFT config.

    Attributes:
        build: ``build(args, model_type, total_steps) -> PeftConfig``; ``args`` is the parsed train.py namespace.
        description: One line for ``--help`` and the README.
        peft_type: The ``peft_type`` of the configs it builds (PEFT's enum value, or our registered string).
        prompt_learning: Virtual-token methods (no target modules; no gradient checkpointing for prefix tuning).
    """

    build: Callable[[argparse.Namespace, str, int], PeftConfig]
    description: str
    peft_type: str
    prompt_learning: bool = False


def _targets(args: argparse.Namespace) -> list[str] | None:
    # None lets PEFT pick its per-architecture default (see default_target_modules).
    return list(args.target_modules) if args.target_modules else None


def _lora(args, model_type, total_steps, **extra) -> LoraConfig:
    return LoraConfig(
        task_type=TASK,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=_targets(args),
        bias="none",
        **extra,
    )


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
    )


def _ia3(args, model_type, total_steps) -> IA3Config:
    targets = _targets(args)
    if targets is None:
        return IA3Config(task_type=TASK)
    # With explicit targets, the feed-forward ones (scaled on their input) are those in PEFT's default list.
    ff_default = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    feedforward = [t for t in targets if t in ff_default]
    return IA3Config(task_type=TASK, target_modules=targets, feedforward_modules=feedforward)


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


ADAPTERS: dict[str, AdapterSpec] = {
    "lora": AdapterSpec(_lora, "LoRA (Hu et al. 2021): W + (alpha/r) B A", "LORA"),
    "dora": AdapterSpec(lambda a, m, t: _lora(a, m, t, use_dora=True), "DoRA: LoRA with a learned magnitude", "LORA"),
    "adalora": AdapterSpec(_adalora, "AdaLoRA: SVD-form LoRA whose rank budget is pruned to --lora_r", "ADALORA"),
    "ia3": AdapterSpec(_ia3, "IA3: learned rescaling of keys, values and feed-forward inputs", "IA3"),
    "loha": AdapterSpec(_lycoris(LoHaConfig), "LoHa: Hadamard product of two low-rank updates", "LOHA"),
    "lokr": AdapterSpec(_lycoris(LoKrConfig), "LoKr: Kronecker-product update", "LOKR"),
    "oft": AdapterSpec(_oft, "OFT: block-diagonal orthogonal rotation of the weights (--oft_block_size)", "OFT"),
    "prefix-tuning": AdapterSpec(_prefix, "prefix tuning: learned key/value prefixes", "PREFIX_TUNING", True),
    "prompt-tuning": AdapterSpec(_prompt, "prompt tuning: learned input embeddings", "PROMPT_TUNING", True),
    "p-tuning": AdapterSpec(_ptuning, "P-tuning: virtual tokens from a prompt encoder", "P_TUNING", True),
}


def register_adapter(name: str, spec: AdapterSpec) -> None:
    """Adds an ``--adapter_name`` choice (used by this package's own tuner types)."""
    if name in ADAPTERS and ADAPTERS[name] is not spec:
        raise KeyError(f"--adapter_name {name!r} is already defined")
    ADAPTERS[name] = spec


def adapter_spec(name: str) -> AdapterSpec:
    key = name.lower()
    if key not in ADAPTERS:
        raise InputError(f"unknown --adapter_name {name!r}; expected one of: {', '.join(ADAPTERS)}")
    return ADAPTERS[key]


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
    # IA3's tuner applies its table in _prepare_adapter_config instead of declaring target_module_mapping.
    table = getattr(PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type], "target_module_mapping", None) or (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING if spec.peft_type == "IA3" else {}
    )
    found = table.get(model_type)
    return list(found) if found is not None else None


def attach_adapter(model, peft_config: PeftConfig):
    """``get_peft_model`` with PEFT's multi-line errors (targets that match nothing, ...) as one-line InputErrors."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        msg = " ".join(str(err).split())
        if "not found in the base model" in msg or "target_modules" in msg.lower():
            targets = sorted(peft_config.target_modules) if peft_config.target_modules else None
            raise InputError(f"--target_modules {targets} match no module of this model: {msg[:300]}") from None
        raise InputError(f"could not attach the adapter: {msg[:300]}") from None
