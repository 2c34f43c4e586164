"""Deep ensembles (Lakshminarayanan et al. 2017) of adapters: several adapters over ONE base model in memory.

Each member (an adapter folder: another seed, or any adapter of the same type trained on the same base model) is
loaded as a named adapter into one ``PeftModel``; a pass activates one member (``set_adapter``), so the base model's
weights are held once however many members there are. The predictive averages the members' option
PROBABILITIES (not their logits); generation with votes runs one pass per member.

Saving records the member folders only (no weights are copied): loading reads the members from their folders again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from peft_bayes.errors import InputError
from peft_bayes.posterior.base import Posterior, Progress, member_folders, pass_tick
from peft_bayes.tuners.catalogue import ADAPTER_CONFIG, read_adapter_config

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_member(folder: str, label: str = "ensemble") -> dict:
    """The ``adapter_config.json`` of an adapter folder; a one-line error (naming the ``label``'s member) when
    ``folder`` holds no adapter."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise InputError(f"{label} member {folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in ADAPTER_WEIGHTS):
        raise InputError(f"{label} member {folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return read_adapter_config(folder)


def check_members(folders: Sequence[str], label: str = "ensemble") -> dict:
    """One-line errors unless ``folders`` are >= 1 adapters of one type trained on one base model; returns the first
    member's config. ``label`` names the mixture in the messages (ensemble, MultiSWAG)."""
    if not folders:
        raise InputError(f"{label} needs at least one member adapter folder")
    configs = [read_member(f, label) for f in folders]
    first = configs[0]
    for folder, config in zip(folders[1:], configs[1:]):
        for key, what in (("base_model_name_or_path", "base models"), ("peft_type", "adapter types")):
            if config.get(key) != first.get(key):
                raise InputError(
                    f"{label} members were trained on different {what}: {folders[0]} has {key} "
                    f"{first.get(key)!r}, {folder} has {config.get(key)!r}"
                )
    return first


def _free_name(model, wanted: str) -> str:
    taken = set(getattr(model, "peft_config", {}))
    name, k = wanted, 1
    while name in taken:
        name, k = f"{wanted}_{k}", k + 1
    return name


@contextlib.contextmanager
def active_member(model, member: str) -> Iterator:
    """Context with adapter ``member`` active; the active adapter and every ``requires_grad`` flag are restored."""
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(member)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class Ensemble(Posterior):
    """Ensemble of the named adapters ``members`` of one ``PeftModel`` (build it with [`Ensemble.from_folders`]).

    Args:
        model: The ``PeftModel`` holding every member as a named adapter.
        members: The members' adapter names.
        folders: The members' folders (what ``save`` records), when they were loaded from folders.
    """

    name: ClassVar[str] = "ensemble"
    default_samples: ClassVar[int] = 0  # per instance: the number of members
    accepts: ClassVar[tuple[str, ...]] = ("members",)
    member_adapters: ClassVar[bool] = True

    def __init__(self, model, members: Sequence[str], folders: Sequence[str] | None = None) -> None:
        super().__init__(model)
        members = list(members)
        loaded = set(getattr(model, "peft_config", {}))
        if not members:
            raise InputError("--posterior ensemble needs at least one member adapter")
        missing = [m for m in members if m not in loaded]
        if missing:
            raise InputError(f"ensemble members {missing} are not adapters of this model (it has {sorted(loaded)})")
        if folders is not None and len(folders) != len(members):
            raise InputError(f"ensemble: {len(members)} members but {len(folders)} folders")
        self.members = members
        self.folders = None if folders is None else [os.path.abspath(f) for f in folders]
        self.default_samples = len(members)

    @classmethod
    def from_args(cls, work) -> Ensemble:
        """evaluate.py loaded the base model without --adapter: every member joins it by name."""
        return cls.from_folders(work.model, member_folders(work.args))

    @classmethod
    def from_folders(cls, model, folders: Sequence[str], prefix: str = "member") -> Ensemble:
        """Loads every adapter folder into one ``PeftModel`` as adapters ``member0``, ``member1``, ...

        Args:
            model: The base model (wrapped here in a ``PeftModel``, in place as PEFT does) or a ``PeftModel`` (the
                members join its adapters; ``ensemble.model`` is the model to score with either way).
            folders: The member adapter folders: one adapter type, trained on one base model.
        """
        from peft import PeftModel

        check_members(folders)
        names = []
        for i, folder in enumerate(folders):
            name = _free_name(model, f"{prefix}{i}")
            if isinstance(model, PeftModel):
                model.load_adapter(folder, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            names.append(name)
        model.set_adapter(names[0], inference_mode=True)
        model.eval()
        return cls(model, names, folders)

    @classmethod
    def from_config(cls, model, config: dict) -> Ensemble:
        folders = config.get("members")
        if not isinstance(folders, list) or not folders:
            raise InputError("saved ensemble: no member folders in its config")
        for folder in folders:
            if not os.path.isdir(folder):
                raise InputError(f"saved ensemble: member folder {folder} does not exist (any more)")
        return cls.from_folders(model, folders)

    # --- what evaluation asks --------------------------------------------------------------------------------
    def resolve_samples(self, requested: int | None) -> int:
        """Auto (None) and 0: every member once; 1 <= N <= members: the first N members."""
        if requested is None:
            return len(self.members)
        if requested > len(self.members):
            raise InputError(
                f"--samples {requested}: the ensemble has {len(self.members)} members (one pass each); "
                f"use --samples {len(self.members)} or fewer"
            )
        return requested

    def passing(self, samples: int) -> list[str]:
        """The members of ``samples`` passes (0: all of them)."""
        return self.members[: self.resolve_samples(samples or None)]

    def mean(self) -> AbstractContextManager:
        raise InputError("an ensemble has no mean weights: evaluate it with one pass per member (--samples auto)")

    def sample(self, seed: int) -> AbstractContextManager:
        """The member ``seed % members`` (``passes`` gives each member its own pass)."""
        return active_member(self.model, self.members[seed % len(self.members)])

    def passes(self, samples: int, seed: int, progress: Progress | None = None) -> Iterator[tuple]:
        """One ``(context, tick)`` per member of ``passing(samples)``; ``seed`` is unused (members are fixed)."""
        members = self.passing(samples)
        n_passes = len(members)
        for index, member in enumerate(members):
            yield active_member(self.model, member), pass_tick(progress, index, n_passes)

    # --- persistence -------------------------------------------------------------------------------------------
    def config(self) -> dict:
        if self.folders is None:
            raise InputError("this ensemble was built from adapters in memory: only one loaded from folders saves")
        first = check_members(self.folders)
        return {
            "members": self.folders,
            "peft_type": first.get("peft_type"),
            "base_model_name_or_path": first.get("base_model_name_or_path"),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], config: dict) -> None:
        if state:
            raise InputError("saved ensemble: unexpected tensors in posterior.safetensors (members are folders)")
