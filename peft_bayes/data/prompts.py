"""Prompt templates, stored as JSON data inside the package (alpaca-lora's ``templates/`` idea)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from peft_bayes.errors import InputError

_REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")


def available_templates() -> list[str]:
    """Names of the templates shipped with the package (file stems under ``peft_bayes/data/templates``)."""
    folder = resources.files("peft_bayes.data").joinpath("templates")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class Prompter:
    """Formats instruction / input / response records with a named template.

    Args:
        prompt_input: Template used when a record has a non-empty ``input`` (fields ``{instruction}``, ``{input}``).
        prompt_no_input: Template used otherwise (field ``{instruction}``).
        response_split: Marker that precedes the response; ``get_response`` splits generations on it.
    """

    prompt_input: str
    prompt_no_input: str
    response_split: str
    name: str = "custom"

    @classmethod
    def from_name(cls, name: str = "alpaca") -> Prompter:
        """Loads a shipped template by name (e.g. ``"alpaca"``) or a template JSON file by path."""
        if name.endswith(".json"):
            try:
                with open(name, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"prompt template {name!r} could not be read: {err}") from None
        else:
            if name not in available_templates():
                raise InputError(f"unknown prompt template {name!r}; available: {', '.join(available_templates())}")
            text = resources.files("peft_bayes.data").joinpath("templates", f"{name}.json").read_text("utf-8")
            data = json.loads(text)
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise InputError(f"prompt template {name!r} lacks the key(s) {', '.join(missing)}")
        return cls(data["prompt_input"], data["prompt_no_input"], data["response_split"], name=name)

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """Returns the prompt for one record; with ``label`` the response is appended (training text)."""
        if input:
            text = self.prompt_input.format(instruction=instruction, input=input)
        else:
            text = self.prompt_no_input.format(instruction=instruction)
        return text + label if label else text

    def get_response(self, output: str) -> str:
        """The part of a decoded generation after the response marker (the whole text if it is absent)."""
        return output.split(self.response_split, 1)[-1].strip() if self.response_split in output else output.strip()
