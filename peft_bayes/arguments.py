"""Argparse value types shared by the scripts (``peft_bayes.cli``) and the benchmarks (``bench/``)."""

from __future__ import annotations

import argparse

from peft_bayes.errors import InputError


def str2bool(value: str | bool) -> bool:
    """Argparse type for LLM-Adapters-style boolean flags (``--train_on_inputs False``)."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise InputError(f"expected a boolean (true/false), got {value!r}")


def comma_list(value: str) -> list[str]:
    """``"q_proj,v_proj"`` or ``"[q_proj, v_proj]"`` (LLM-Adapters' fire syntax) → ``["q_proj", "v_proj"]``."""
    value = value.strip().strip("[]")
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip().strip("'\"")]


def positive_ints(text: str) -> list[int]:
    """Argparse type for ``"8,16,64"``: positive integers separated by commas."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values
