"""Argparse pieces shared by the scripts (``peft_bayes.cli``) and the benchmarks (``bench/``): value types, and a
parser with every default in its help and one-line errors."""

from __future__ import annotations

import argparse
import copy

from peft_bayes.errors import InputError, did_you_mean


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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows every flag's one true default: ``(default: X)`` after each flag that takes a value and has a
    default, whether or not it has help text; nothing for a default of None (the help text says what happens) and
    for on/off switches; nothing added where the help already gives the default."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default_text(action):
            action = copy.copy(action)
            action.help = self._default_text(action)  # no help text: the default alone
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        default = self._default_text(action)
        if default and "%(default)" not in text and "(default" not in text:
            text = f"{text} {default}".strip()
        return text

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return ""
        return "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with LLM-Adapters-friendly help (every default shown), a one-line error (no usage dump) for unknown
    or bad flags, and the nearest valid name suggested for a mistyped choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, invalid_choice(value, action.choices))

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def invalid_choice(value, choices) -> str:
    """``invalid choice 'lroa' (did you mean 'lora'?); choose from ...``: the nearest names first."""
    names = [str(c) for c in choices]
    return f"invalid choice {value!r}{did_you_mean(value, names)}; choose from {', '.join(names)}"
