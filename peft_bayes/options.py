"""Option dataclasses: ``str`` enums, validation that names the field, and argparse flags built from the fields.

A setting of the library is a field of an options dataclass (``LaplaceOptions``, ``SwagOptions``, ``TrainOptions``,
...). Its one default is the field's default; its help text and its script flag live in the field's metadata
(:func:`option`). The scripts build their flags from the fields (:func:`add_option_flags`) and read them back
(:func:`options_from_args`); where a flag's name is not the field's (LLM-Adapters' and the authors' flag names), the
field says so (``flag=``), so there is no separate flag-to-field map.

Validation raises :class:`OptionError`, whose message names fields between backticks in its template: the Python
API reports ``structure must be one of kron/diag/full``, a script ``--laplace_structure must be one of ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from types import UnionType
from typing import Any

from peft_bayes.arguments import str2bool
from peft_bayes.errors import InputError, did_you_mean

_FIELD = re.compile(r"`(\w+)`")


class OptionEnum(str, Enum):
    """A ``str`` enum of option values: equal to, hashed, printed and saved (JSON) as its value."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]


class OptionError(InputError):
    """A bad option value. ``template`` names fields between backticks: ``str(err)`` shows the field names,
    :meth:`render` any other spelling (the scripts' ``--flags``)."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        return _FIELD.sub(lambda m: name_of(m.group(1)), self.template)


def require(ok: bool, template: str) -> None:
    """Raises ``OptionError(template)`` unless ``ok``."""
    if not ok:
        raise OptionError(template)


def option(default: Any = None, help: str = "", *, flag: str | bool | None = None, **metadata) -> Any:
    """A dataclass field with its help text and flag: ``flag`` is the script flag's name (None: the field's name;
    False: the scripts have no such flag). Further ``metadata`` (e.g. ``stage="fit"``) is kept for the scripts."""
    extra = {"help": help, "flag": flag, **metadata}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=extra)
    return dataclasses.field(default=default, metadata=extra)


def coerce_enums(options) -> None:
    """Turns every enum-typed field's value into its member (a string given to a dataclass); an unknown value is an
    ``OptionError`` naming the field, the allowed values and the nearest one. Call from ``__post_init__``."""
    for name, kind in _field_types(type(options)).items():
        enum = _enum_of(kind)
        value = getattr(options, name)
        if enum is None or value is None or isinstance(value, enum):
            continue
        if value not in enum.values():
            allowed = enum.values()
            raise OptionError(
                f"`{name}` must be one of {'/'.join(allowed)}, got {value!r}{did_you_mean(value, allowed)}"
            )
        setattr(options, name, enum(value))


def flag_fields(
    cls, include: Iterable[str] | None = None, hand_written: bool = False, **where
) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are script flags (declared with :func:`option`, not ``flag=False``), in order;
    ``include``: only those names; ``where``: only fields whose metadata has these values (``stage="fit"``).
    Fields whose flag the script declares and parses itself (``hand_written=True`` in their metadata, e.g. SWAG's
    ``--swag_start`` that sets one of two fields) only with ``hand_written``."""
    names = None if include is None else set(include)
    return [
        f
        for f in dataclasses.fields(cls)
        if "flag" in f.metadata
        and f.metadata["flag"] is not False
        and (hand_written or not f.metadata.get("hand_written"))
        and (names is None or f.name in names)
        and all(f.metadata.get(k) == v for k, v in where.items())
    ]


def flag_name(cls, name: str) -> str:
    """The script flag (without dashes) of field ``name`` of ``cls``; the field's name where it has none."""
    for f in dataclasses.fields(cls):
        if f.name == name and isinstance(f.metadata.get("flag"), str):
            return f.metadata["flag"]
    return name


def flags_of(cls, **where) -> list[str]:
    """The script flags of ``cls``'s fields (see :func:`flag_fields`; hand-written ones too), each once."""
    return list(dict.fromkeys(flag_name(cls, f.name) for f in flag_fields(cls, hand_written=True, **where)))


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def add_option_flags(parser, cls, *, include: Iterable[str] | None = None, defaults: bool = False, **where) -> None:
    """Adds one flag per flag field of ``cls`` to ``parser`` (a parser or an argument group).

    The type comes from the annotation (``bool``: ``--flag``, ``--flag true/false``; an :class:`OptionEnum`: its
    values as choices; ``X | None``: X), the help from the field's metadata. ``defaults``: the flag's default is the
    field's (what the run records); otherwise None, so that a flag that was not given is known, and the help says
    the field's default.
    """
    hints = _field_types(cls)
    for field in flag_fields(cls, include, **where):
        kind = _strip_none(hints[field.name])
        default = default_of(field)
        kwargs: dict[str, Any] = {"default": default if defaults else None, "help": field.metadata.get("help", "")}
        shown = field.metadata.get("default_text", default)
        if not defaults and shown is not None:
            kwargs["help"] = f"{kwargs['help']} (default: {shown})".strip()
        enum = _enum_of(kind)
        if kind is bool:
            kwargs.update(type=str2bool, nargs="?", const=True)
        elif enum is not None:
            kwargs["choices"] = enum.values()
            if defaults and default is not None:
                kwargs["default"] = str(default)
        elif kind in (int, float, str):
            kwargs["type"] = kind
        parser.add_argument(f"--{flag_name(cls, field.name)}", **kwargs)


def option_values(cls, args, include: Iterable[str] | None = None, **where) -> dict[str, Any]:
    """The flag fields' values given in ``args`` (an argparse namespace): field name -> value, skipping flags that
    the namespace lacks or holds as None."""
    values = {}
    for field in flag_fields(cls, include, **where):
        value = getattr(args, flag_name(cls, field.name), None)
        if value is not None:
            values[field.name] = value
    return values


def options_from_args(cls, args, include: Iterable[str] | None = None, **overrides):
    """``cls`` built from the flags in ``args`` (the field defaults where a flag was not given) and ``overrides``; an
    invalid value is an ``InputError`` naming the script's flag."""
    return with_flag_names(cls, lambda: cls(**{**option_values(cls, args, include), **overrides}))


def with_flag_names(cls, build: Callable[[], Any]) -> Any:
    """Runs ``build()``; an ``OptionError`` from it becomes an ``InputError`` naming ``cls``'s script flags."""
    try:
        return build()
    except OptionError as err:
        raise InputError(err.render(lambda name: "--" + flag_name(cls, name))) from None


def _field_types(cls) -> Mapping[str, Any]:
    """The resolved annotations of the fields declared with :func:`option` (each in its own module's namespace:
    other fields, e.g. PEFT's in a config that extends ``LoraConfig``, are left alone)."""
    types = {}
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        owner = next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
        kind = owner.__annotations__[f.name]
        types[f.name] = eval(kind, vars(sys.modules[owner.__module__])) if isinstance(kind, str) else kind
    return types


def _strip_none(kind):
    args = typing.get_args(kind)
    if (typing.get_origin(kind) in (typing.Union, UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _enum_of(kind) -> type[OptionEnum] | None:
    kind = _strip_none(kind)
    return kind if isinstance(kind, type) and issubclass(kind, OptionEnum) else None


def parser_group(parser: argparse.ArgumentParser, title: str):
    """The argument group ``title`` of ``parser``, created the first time."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)
