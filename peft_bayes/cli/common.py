"""What the three scripts share: the one-line error wrapper, the settings an adapter's train_args.json records,
the model flags of evaluate.py and generate.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from peft_bayes.errors import InputError
from peft_bayes.models import LoadOptions
from peft_bayes.options import add_option_flags


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


def add_model_flags(p: argparse.ArgumentParser, adapter_help: str) -> None:
    """The model flags evaluate.py and generate.py share: the base model, an adapter folder, its expected kind, the
    prompt template, how the base is loaded."""
    p.add_argument("--base_model", required=True, help="local model directory, Hub id or smollm2-135m (packaged)")
    p.add_argument("--adapter", "--lora_weights", dest="adapter", default=None, help=adapter_help)
    p.add_argument(
        "--adapter_name", default=None, help="optional: check that --adapter holds this kind (lora, adapterh, ...)"
    )
    p.add_argument(
        "--prompt_template",
        default=None,
        help="template name or JSON file; chat: the tokenizer's (default: the one the adapter's train_args.json "
        "records, else alpaca)",
    )
    add_option_flags(p, LoadOptions, include=("load_8bit", "load_4bit", "trust_remote_code"), defaults=True)


def add_recorded_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--override_train_args",
        action="store_true",
        help="use --prompt_template / --choice_format as given even where the adapter's train_args.json records "
        "another value (without it such a conflict is an error; an unset flag takes the recorded value)",
    )
