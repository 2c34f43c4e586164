"""MultiSWAG (Wilson & Izmailov 2020): an even mixture of several independently trained SWAG posteriors.

Each member is an adapter folder with its SWAG posterior saved next to it (``<adapter>/posterior/swag``, as
``train.py --posterior swag`` writes it). The members are loaded as named adapters (``swag0``, ``swag1``, ...) into one
``PeftModel`` over one base model in memory. Pass ``i`` of ``N`` draws from member ``i mod M`` with that member's
adapter active and seed ``sample_seed(seed, i)``, so ``N`` (a multiple of M) splits evenly; option probabilities are
averaged over all passes. The deterministic pass (``samples == 0``) is one pass per member with its SWA mean.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import ClassVar

from peft_bayes.errors import InputError
from peft_bayes.options import flags_of
from peft_bayes.posterior.base import Posterior, Progress, member_folders, pass_tick, posterior_folder, sample_seed
from peft_bayes.posterior.ensemble import check_members as check_adapter_members
from peft_bayes.posterior.swag import Swag, SwagOptions, sample_scale_from_args

MEMBER_PREFIX = "swag"


def check_members(folders: Sequence[str]) -> None:
    """One-line errors for no member, or members of different base models or adapter types."""
    check_adapter_members(folders, "MultiSWAG")


class MultiSwag(Posterior):
    """Mixture of the SWAG posteriors of ``members`` (adapter folders), loaded into ``model`` (a ``PeftModel`` of the
    members' base model) as adapters ``swag0``, ``swag1``, ... (kept where the model already has that name).

    Build it from a bare base model with :meth:`from_folders`, or with ``load_posterior`` from a saved one.
    """

    name: ClassVar[str] = "multiswag"
    accepts: ClassVar[tuple[str, ...]] = ("members", *flags_of(SwagOptions, stage="sample"))
    member_adapters: ClassVar[bool] = True

    def __init__(self, model, members: Sequence[str]) -> None:
        super().__init__(model)
        self.members = [os.path.abspath(m) for m in members]
        check_members(self.members)
        self.adapter_names = [f"{MEMBER_PREFIX}{i}" for i in range(len(self.members))]
        for folder, name in zip(self.members, self.adapter_names):
            if name not in model.peft_config:
                model.load_adapter(folder, adapter_name=name)
        self.swags = [
            Swag.load(model, posterior_folder(folder, Swag.name), name)
            for folder, name in zip(self.members, self.adapter_names)
        ]

    @classmethod
    def from_args(cls, work) -> MultiSwag:
        posterior = cls.from_folders(work.model, member_folders(work.args))
        sample_scale_from_args(posterior, work.args)
        return posterior

    @classmethod
    def from_folders(cls, base_model, members: Sequence[str]) -> MultiSwag:
        """A ``PeftModel`` over ``base_model`` holding every member adapter, and its MultiSWAG posterior."""
        from peft import PeftModel

        check_members(members)
        model = PeftModel.from_pretrained(base_model, members[0], adapter_name=f"{MEMBER_PREFIX}0")
        return cls(model, members)

    @property
    def sample_scale(self) -> float:
        return self.swags[0].sample_scale

    @sample_scale.setter
    def sample_scale(self, value: float) -> None:
        for swag in self.swags:
            swag.sample_scale = value

    # --- what evaluation asks ---------------------------------------------------------------------------------------
    def resolve_samples(self, requested: int | None) -> int:
        """Auto: the smallest multiple of the member count at least ``default_samples``; N must split evenly."""
        m = len(self.swags)
        if requested is None:
            return -(-self.default_samples // m) * m
        if requested % m:
            raise InputError(f"--samples {requested} must be a multiple of the {m} MultiSWAG members (or 0)")
        return requested

    @contextlib.contextmanager
    def _member(self, index: int, seed: int | None) -> Iterator:
        """Member ``index``'s adapter active, holding its SWA mean (``seed`` None) or one sample."""
        model, swag = self.model, self.swags[index]
        previous = model.active_adapter
        trainable = any(p.requires_grad for p in model.parameters())
        model.set_adapter(self.adapter_names[index], inference_mode=True)
        try:
            with swag.mean() if seed is None else swag.sample(seed):
                yield model
        finally:
            model.set_adapter(previous, inference_mode=not trainable)

    def mean(self) -> contextlib.AbstractContextManager:
        """The first member's SWA mean (``passes(0)`` gives every member's)."""
        return self._member(0, None)

    def sample(self, seed: int) -> contextlib.AbstractContextManager:
        """One sample of the first member (``passes`` spreads the samples over the members)."""
        return self._member(0, seed)

    def passes(self, samples: int, seed: int, progress: Progress | None = None) -> Iterator[tuple]:
        m = len(self.swags)
        if samples % m:
            raise InputError(f"--samples {samples} must be a multiple of the {m} MultiSWAG members (or 0)")
        n_passes = samples or m
        for index in range(n_passes):
            member = index % m
            context = self._member(member, None if samples == 0 else sample_seed(seed, index))
            yield context, pass_tick(progress, index, n_passes)

    # --- persistence ------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"members": self.members, "sample_scale": self.sample_scale}

    @classmethod
    def from_config(cls, model, config: dict) -> MultiSwag:
        if not isinstance(config.get("members"), list):
            raise InputError("saved MultiSWAG posterior: no member list in its config")
        posterior = cls(model, config["members"])
        posterior.sample_scale = float(config.get("sample_scale", posterior.sample_scale))
        return posterior
