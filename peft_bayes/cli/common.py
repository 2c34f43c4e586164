"""Helpers shared by the three scripts: one-line errors, atomic writes, flag types."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable

from peft_bayes.arguments import comma_list, positive_ints, str2bool  # noqa: F401  (the scripts' flag types)
from peft_bayes.errors import InputError, did_you_mean


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


def progress_printer(label: str, quiet: bool = False, stream=None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback printing ``label: done/total`` to ``stream`` (stdout): redrawn in place on
    a terminal; elsewhere (a log file, a pipe) one plain line at each tenth of the way, so logs stay short."""
    state = {"shown": -1}

    def progress(done: int, total: int) -> None:
        out = stream or sys.stdout
        if quiet:
            return
        if out.isatty():
            print(f"\r{label}: {done}/{total}", end="" if done < total else "\n", file=out, flush=True)
            return
        tenth = 10 * done // max(total, 1)
        if tenth > state["shown"] or done >= total:
            if done >= total and state["shown"] == 10:
                return
            state["shown"] = 10 if done >= total else tenth
            print(f"{label}: {done}/{total}", file=out, flush=True)

    return progress


def quiet_progress_bars_off_terminal() -> bool:
    """Off a terminal (stderr redirected to a log), turns off the progress bars of transformers (weight loading)
    and huggingface_hub: redrawn bars become thousands of lines in a log. Returns whether it did (the Trainer's own
    bar is turned off through ``TrainingArguments(disable_tqdm=...)``; its log lines remain)."""
    if sys.stderr.isatty():
        return False
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    return True


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Runs a script's ``main``; bad input becomes ``error: <one line>`` on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


TRAIN_ARGS = "train_args.json"
# train.py's own default choice format: it records "label" for any data, so a recorded "label" says nothing about
# how the adapter should be scored and is never enforced
UNRECORDED_CHOICE_FORMAT = "label"


def recorded_train_args(adapter: str | None) -> dict:
    """The settings train.py recorded beside an adapter (``train_args.json``); {} without one (an adapter from
    elsewhere) or when it cannot be read."""
    path = os.path.join(adapter, TRAIN_ARGS) if adapter else None
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def apply_recorded_settings(args, defaults: dict[str, str]) -> str | None:
    """Sets each flag of ``defaults`` (flag name -> default) that was not given (None) to the value the adapter's
    ``train_args.json`` recorded, else to its default. Returns the line that says which came from the adapter (None
    when none did), for the script to print once its checks have passed, so that an error stays the only line.

    A flag given explicitly with a value other than the recorded one is refused (an adapter prompted with another
    template than it was trained on answers worse and nothing else warns), unless ``--override_train_args``."""
    recorded = recorded_train_args(getattr(args, "adapter", None))
    taken, conflicts = [], []
    for name, default in defaults.items():
        value = recorded.get(name)
        if name == "choice_format" and value == UNRECORDED_CHOICE_FORMAT:
            value = None
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value if isinstance(value, str) else default)
            if isinstance(value, str):
                taken.append(f"--{name} {value}")
        elif isinstance(value, str) and given != value:
            conflicts.append(f"--{name} {given} (trained with {value})")
    where = os.path.join(args.adapter, TRAIN_ARGS) if recorded else ""
    if conflicts and not getattr(args, "override_train_args", False):
        raise InputError(
            f"{', '.join(conflicts)}: the adapter's {where} records another setting; drop the flag to use the "
            "recorded one, or add --override_train_args to use yours"
        )
    return f"{', '.join(taken)}: as recorded in {where}" if taken else None


def add_recorded_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--override_train_args",
        action="store_true",
        help="use --prompt_template / --choice_format as given even where the adapter's train_args.json records "
        "another value (without it such a conflict is an error; an unset flag takes the recorded value)",
    )
