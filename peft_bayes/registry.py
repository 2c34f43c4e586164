"""The one place that plugs peft_bayes' tuner types into PEFT.

PEFT looks tuners up in four dicts keyed by ``PeftType`` (``peft.mapping.PEFT_TYPE_TO_*_MAPPING``). Its public
``register_peft_method`` only accepts names that are members of the closed ``PeftType`` enum, so new methods cannot
use it. ``PeftType`` is a ``str`` enum whose members hash and compare equal to their string values, which is why
PEFT's lookups work unchanged with plain upper-case string keys: ``register_tuner`` writes those. A config class
of ours sets ``peft_type`` to the same string, so ``adapter_config.json`` stores it and
``PeftModel.from_pretrained`` finds the classes again once ``peft_bayes`` is imported.

We touch PEFT internals here, so the PEFT version is pinned to a minor range and checked at import.
"""

from __future__ import annotations

from dataclasses import dataclass

import peft
from packaging.version import Version

# Keep in sync with pyproject.toml's `peft` requirement.
PEFT_MIN = Version("0.21.0")
PEFT_MAX_EXCLUSIVE = Version("0.22.0")


@dataclass(frozen=True)
class RegisteredTuner:
    name: str
    peft_type: str
    config_cls: type
    model_cls: type
    prefix: str


_REGISTERED: dict[str, RegisteredTuner] = {}


def check_peft_version(version: str | None = None) -> None:
    """Raises ``ImportError`` unless the installed PEFT is in the range whose internals we write into."""
    found = Version(version or peft.__version__)
    if not (PEFT_MIN <= found < PEFT_MAX_EXCLUSIVE):
        raise ImportError(
            f"peft_bayes needs peft>={PEFT_MIN},<{PEFT_MAX_EXCLUSIVE} (it registers tuners in PEFT's internal "
            f"mappings), but peft {found} is installed; run: pip install 'peft>={PEFT_MIN},<{PEFT_MAX_EXCLUSIVE}'"
        )


def peft_type_of(name: str) -> str:
    """The ``peft_type`` string stored in ``adapter_config.json`` for a tuner called ``name``."""
    return name.upper()


def register_tuner(
    name: str, config_cls: type, model_cls: type, prefix: str | None = None, shares_prefix_with: str | None = None
) -> RegisteredTuner:
    """Makes a tuner type known to PEFT (``get_peft_model``, saving, ``PeftModel.from_pretrained``).

    Args:
        name: Lower-case method name, e.g. ``"bayeslora"``; its upper-case form is the ``peft_type``.
        config_cls: A ``PeftConfig`` subclass whose ``__post_init__`` sets ``peft_type = name.upper()``.
        model_cls: A ``BaseTuner`` subclass; its ``prefix`` class attribute must equal ``prefix``.
        prefix: Parameter-name prefix of the tuner's weights; ``name + "_"`` by default.
        shares_prefix_with: The ``peft_type`` of a tuner whose prefix this one deliberately reuses because its layers
            subclass that tuner's (``"LORA"`` for ``bayeslora``, as PEFT's own AdaLoRA shares ``"lora_"``).

    Registering the same classes twice is a no-op; a different tuner under a taken name or prefix is an error.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if not name or not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(f"tuner name must be lower-case letters, digits and '_', got {name!r}")
    peft_type = peft_type_of(name)
    prefix = prefix if prefix is not None else name + "_"
    entry = RegisteredTuner(name, peft_type, config_cls, model_cls, prefix)
    if _REGISTERED.get(name) == entry:
        return entry
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        raise KeyError(f"a PEFT method named {name!r} is already registered")
    users = sorted(str(getattr(t, "value", t)) for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix)
    if users and shares_prefix_with not in users:
        raise KeyError(f"parameter prefix {prefix!r} of tuner {name!r} is already used by {', '.join(users)}")
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_prefix!r}, expected {prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    _REGISTERED[name] = entry
    return entry


def registered_tuners() -> dict[str, RegisteredTuner]:
    """The tuner types peft_bayes has registered, by name."""
    return dict(_REGISTERED)
