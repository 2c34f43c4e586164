"""peft_bayes.options: str enums, errors naming fields or flags, and argparse flags built from option dataclasses; and
every options dataclass of the package read through it (one default each, flags that round-trip)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from peft_bayes.arguments import ArgumentParser
from peft_bayes.errors import InputError
from peft_bayes.evaluation.choice_scoring import ChoiceOptions
from peft_bayes.models import LoadOptions
from peft_bayes.options import (
    OptionEnum,
    OptionError,
    add_option_flags,
    coerce_enums,
    default_of,
    flag_fields,
    flag_name,
    flags_of,
    option,
    option_values,
    options_from_args,
    require,
)
from peft_bayes.posterior import LaplaceOptions, SwagOptions
from peft_bayes.posterior.mc_dropout import MCDropoutOptions
from peft_bayes.posterior.tfb import TfbOptions
from peft_bayes.train_config import BayesTrainingOptions, TrainOptions
from peft_bayes.tuners import BayesLoraConfig


class Color(OptionEnum):
    RED = "red"
    DARK_BLUE = "dark_blue"


@dataclasses.dataclass
class Toy:
    color: Color = option(Color.RED, "the colour", flag="toy_color")
    size: int = option(3, "how big")
    ratio: float | None = option(None, "a fraction", default_text="none: all")
    loud: bool = option(False, "shout")
    start_a: int | None = option(None, flag="toy_start", hand_written=True)
    start_b: int | None = option(None, flag="toy_start", hand_written=True)
    hidden: int = option(7, flag=False)
    plain: int = 0  # not an option(): no flag

    def __post_init__(self) -> None:
        coerce_enums(self)
        require(self.size > 0, f"`size` must be positive, got {self.size}")
        require(self.ratio is None or self.size > 1, "`ratio` needs `size` > 1")


def test_an_option_enum_is_its_value():
    assert Color.RED == "red" and hash(Color.RED) == hash("red") and {"red": 1}[Color.RED] == 1
    assert f"{Color.DARK_BLUE}" == str(Color.DARK_BLUE) == "dark_blue"
    assert json.dumps({"c": Color.RED}) == '{"c": "red"}'
    assert Color.values() == ["red", "dark_blue"]


def test_strings_become_members_and_unknown_values_name_the_field():
    toy = Toy(color="dark_blue")
    assert toy.color is Color.DARK_BLUE
    with pytest.raises(OptionError, match=r"^color must be one of red/dark_blue, got 'dark_blu' \(did you mean") as e:
        Toy(color="dark_blu")
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)


def test_an_error_names_fields_in_python_and_flags_in_the_scripts():
    with pytest.raises(OptionError) as err:
        Toy(size=1, ratio=0.5)
    assert str(err.value) == "ratio needs size > 1"
    assert err.value.render(lambda name: f"--{flag_name(Toy, name)}") == "--ratio needs --size > 1"
    with pytest.raises(InputError, match=r"^--toy_color must be one of red/dark_blue, got 'green'$"):
        options_from_args(Toy, argparse.Namespace(toy_color="green"))
    with pytest.raises(InputError, match=r"^--size must be positive, got 0$"):
        options_from_args(Toy, argparse.Namespace(size=0))


def test_flags_from_the_fields():
    parser = ArgumentParser(prog="toy")
    add_option_flags(parser, Toy)
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    assert set(flags) == {"help", "toy_color", "size", "ratio", "loud"}  # not hand-written, flag=False or plain
    assert flags["toy_color"].choices == ["red", "dark_blue"] and flags["size"].type is int
    assert all(flags[f].default is None for f in ("toy_color", "size", "ratio", "loud"))
    assert flags["size"].help == "how big (default: 3)" and flags["ratio"].help == "a fraction (default: none: all)"
    args = parser.parse_args(["--toy_color", "dark_blue", "--loud", "--size", "5"])
    assert option_values(Toy, args) == {"color": "dark_blue", "size": 5, "loud": True}
    assert options_from_args(Toy, args, size=9) == Toy(color=Color.DARK_BLUE, size=9, loud=True)
    assert options_from_args(Toy, parser.parse_args(["--loud", "false"])) == Toy()  # given, and the default
    assert flags_of(Toy) == ["toy_color", "size", "ratio", "loud", "toy_start"]  # hand-written ones once


def test_flags_with_the_fields_defaults():
    parser = argparse.ArgumentParser()
    add_option_flags(parser, Toy, defaults=True)
    args = parser.parse_args([])
    assert vars(args) == {"toy_color": "red", "size": 3, "ratio": None, "loud": False}
    assert options_from_args(Toy, args) == Toy()


OPTIONS = [LaplaceOptions, SwagOptions, MCDropoutOptions, TfbOptions, TrainOptions, BayesTrainingOptions, LoadOptions,
           ChoiceOptions]  # fmt: skip


@pytest.mark.parametrize("cls", [*OPTIONS, BayesLoraConfig], ids=lambda c: c.__name__)
def test_every_options_class_reads_its_defaults_back_from_its_flags(cls):
    """The flags' defaults are the fields' (one copy), every flag field has help text, and parsing no flag rebuilds
    the defaults."""
    parser = argparse.ArgumentParser()
    add_option_flags(parser, cls, defaults=True)
    args = parser.parse_args([])
    for field in flag_fields(cls):
        assert field.metadata["help"], f"{cls.__name__}.{field.name} has no help text"
        assert getattr(args, flag_name(cls, field.name)) == default_of(field)
    values = option_values(cls, args)
    built = cls(**values) if cls is not BayesLoraConfig else cls(task_type="CAUSAL_LM", **values)
    assert {k: getattr(built, k) for k in values} == values


def test_no_two_options_classes_claim_one_flag():
    """Within a script a flag means one field: the flags of every options class are distinct."""
    flags = [f for cls in [*OPTIONS, BayesLoraConfig] for f in flags_of(cls)]
    assert len(flags) == len(set(flags))


def test_train_options_checks_and_steps():
    with pytest.raises(InputError, match="^micro_batch_size 3 does not divide batch_size 10$"):
        TrainOptions(batch_size=10, micro_batch_size=3)
    with pytest.raises(InputError, match=r"^--warmup_ratio must be in \[0, 1\), got 1.0$"):
        options_from_args(TrainOptions, argparse.Namespace(warmup_ratio=1.0))
    options = TrainOptions(batch_size=32, micro_batch_size=4, num_epochs=1.5, warmup_ratio=0.1)
    assert options.accumulation(world=2) == 4
    with pytest.raises(InputError, match="8 micro-batches is not divisible by the 3 processes"):
        options.accumulation(world=3)
    # 100 examples, 4 per forward on 2 processes: ceil(100 / 8) = 13 forwards -> 13 // 4 = 3 steps per epoch
    assert options.steps_per_epoch(100, accum=4, world=2) == 3
    assert options.total_steps(100, accum=4, world=2) == 5  # ceil(3 * 1.5)
    assert options.warmup(total_steps=5) == 1  # ceil(0.1 * 5)
    assert TrainOptions(max_steps=7, warmup_steps=100).warmup(7) == 6  # below the total
