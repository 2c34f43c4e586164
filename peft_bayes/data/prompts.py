"""Prompt templates: JSON data inside the package (alpaca-lora's ``templates/`` idea), or the tokenizer's own chat
template (``"chat"``: instruct models such as SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from peft_bayes.errors import InputError

_REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")
CHAT = "chat"  # the template name that stands for the tokenizer's own chat template


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
    def from_name(cls, name: str = "alpaca", tokenizer=None) -> Prompter | ChatPrompter:
        """Loads a shipped template by name (e.g. ``"alpaca"``) or a template JSON file by path.

        ``"chat"`` gives a :class:`ChatPrompter` built on ``tokenizer``'s chat template (required for that name only).
        """
        if name == CHAT:
            return ChatPrompter.from_tokenizer(tokenizer)
        if name.endswith(".json"):
            try:
                with open(name, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"prompt template {name!r} could not be read: {err}") from None
        else:
            if name not in available_templates():
                known = ", ".join([*available_templates(), CHAT])
                raise InputError(f"unknown prompt template {name!r}; available: {known}")
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


_USER, _ANSWER = "\x00user\x00", "\x00answer\x00"  # sentinels: no template adds or rewrites NUL characters


@dataclass(frozen=True)
class ChatPrompter:
    """Formats records with a tokenizer's chat template, with the interface of :class:`Prompter`.

    The prompt is the template's rendering of one user turn (the instruction, then a blank line and the input when
    there is one) with the generation prompt, e.g. ``<|im_start|>assistant\\n`` for ChatML. A training text appends
    the response and the template's end of turn (``<|im_end|>``). Both markers are read off the template by rendering
    sentinel conversations, never hard-coded.

    Args:
        tokenizer: A tokenizer whose ``chat_template`` is set.
        response_split: What the generation prompt adds after a user turn; ``get_response`` splits on it.
        end_of_turn: What follows an assistant answer (trailing whitespace dropped); empty if the template adds none.
        strip_bos: Drop the template's leading BOS text, because the tokenizer adds a BOS token itself.
    """

    tokenizer: Any = field(repr=False, compare=False)
    response_split: str
    end_of_turn: str
    strip_bos: bool = False
    name: str = CHAT

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatPrompter:
        """Reads the generation prompt and the end-of-turn marker off ``tokenizer``'s chat template."""
        if tokenizer is None:
            raise InputError("prompt template 'chat' needs the tokenizer (Prompter.from_name('chat', tokenizer=tok))")
        label = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"tokenizer {label!r} has no chat template (--prompt_template chat needs one)")
        user = [{"role": "user", "content": _USER}]
        try:
            bare = _render(tokenizer, user, False)
            asked = _render(tokenizer, user, True)
            turn = _render(tokenizer, [*user, {"role": "assistant", "content": _ANSWER}], False)
        except Exception as err:  # jinja raises many types; the first line names the problem
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise InputError(f"chat template of tokenizer {label!r} cannot render a user turn: {first}") from None
        split = asked[len(bare) :] if asked.startswith(bare) else ""
        end = turn.split(_ANSWER, 1)[1].rstrip() if _ANSWER in turn else ""
        bos = tokenizer.bos_token
        strip_bos = bool(bos) and asked.startswith(bos) and _adds_bos(tokenizer)
        return cls(tokenizer, response_split=split, end_of_turn=end, strip_bos=strip_bos)

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The chat prompt for one record; with ``label`` the answer and the end of turn follow (training text)."""
        content = f"{instruction}\n\n{input}" if input else instruction
        text = _render(self.tokenizer, [{"role": "user", "content": content}], True)
        if self.strip_bos:
            text = text[len(self.tokenizer.bos_token) :]
        return text + label + self.end_of_turn if label else text

    def get_response(self, output: str) -> str:
        """The answer in a decoded generation: after the generation prompt if the text holds it (a full decode with
        special tokens), up to the end-of-turn marker if present; stripped. Works on new tokens only too."""
        if self.response_split and self.response_split in output:
            output = output.split(self.response_split, 1)[1]
        if self.end_of_turn and self.end_of_turn in output:
            output = output.split(self.end_of_turn, 1)[0]
        return output.strip()


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _adds_bos(tokenizer) -> bool:
    # Tokenizers that prepend BOS on their own (LLaMA's) would double a BOS the template writes as text.
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
