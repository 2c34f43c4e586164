"""The methods table of ``bench/real_model_calibration.py``: each method's training recipe, its evaluation variants
(one table row each) and the flags they pass to train.py and evaluate.py; the stored-state map and the paths."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "llm-adapters" / "dataset"


STEM = "real_model_calibration"


ECE_BINS = 15  # evaluate.py's bins (peft_bayes.evaluation.calibration.ECE_BINS)


Flags = Callable[[argparse.Namespace], list[str]]


@dataclass(frozen=True)
class Variant:
    """One evaluation of a method: a table row. ``label`` may use the settings (``{samples}``)."""

    key: str
    label: str
    flags: Flags
    per_seed: bool = True  # False: the result does not depend on the seed (zero-shot), run once
    val_slice: bool = False  # True: fits on the validation slice (``a.val_slice``), which is then written


@dataclass(frozen=True)
class Method:
    """``train``: a key of ``TRAININGS`` (methods naming the same recipe share one trained adapter) or None;
    ``members``: the settings attribute holding how many adapters of the recipe the method uses (ensembles: member
    i > 0 is trained with seed + 1000 i; its folders are ``args.members_of[recipe]`` when the flags are built)."""

    train: str | None
    variants: tuple[Variant, ...]
    members: str | None = None

    def n_members(self, args: argparse.Namespace) -> int:
        return int(getattr(args, self.members)) if self.members else 1


def _bayes_flags(optimizer: str | None = None) -> Flags:
    """BayesLoRA's train.py flags; ``optimizer`` fixes ``--bayes_optimizer`` (else the bench's)."""

    def flags(a: argparse.Namespace) -> list[str]:
        opt = optimizer or a.bayes_optimizer
        out = ["--adapter_name", "bayeslora", "--prior_std", str(a.prior_std), "--bayes_eps", str(a.bayes_eps),
               "--kl_weight", str(a.kl_weight), "--bayes_optimizer", opt]  # fmt: skip
        if opt == "single":
            return out + ["--kl_schedule", a.kl_schedule]
        return out + [
            "--bayes_kllr",
            str(a.bayes_kllr),
            "--bayes_gamma",
            str(a.bayes_gamma),
            "--bayes_datasetrescaling",
            str(a.bayes_datasetrescaling).lower(),
        ]

    return flags


def _swag_train_flags(a: argparse.Namespace) -> list[str]:
    return [
        "--adapter_name",
        "lora",
        "--posterior",
        "swag",
        "--swag_start",
        a.swag_start,
        "--swag_collect_every",
        str(a.swag_collect_every),
        "--swag_max_num_models",
        str(a.swag_max_num_models),
    ] + (["--swag_learning_rate", str(a.swag_learning_rate)] if a.swag_learning_rate is not None else [])


def _bayes_method(key: str, recipe: str, name: str) -> Method:
    """A BayesLoRA method's two rows: N posterior samples (``--bayes_eval_draw``) and N = 0, the posterior mean."""
    sampled = lambda a: ["--samples", str(a.samples), "--bayes_eval_draw", a.bayes_eval_draw]  # noqa: E731
    return Method(
        recipe,
        (
            Variant(f"{key}:samples", f"{name} (N={{samples}})", sampled),
            Variant(f"{key}:mean", f"{name} (N=0, mean)", lambda a: ["--samples", "0"]),
        ),
    )


# training recipe -> train.py flags beyond the shared ones (model, data, rank, lr, batch, seed, ...)
TRAININGS: dict[str, Flags] = {
    "lora": lambda a: ["--adapter_name", "lora"],
    "bayeslora": _bayes_flags(),
    "bayeslora-single": _bayes_flags("single"),  # the one-AdamW path, beside BLoB's two optimizers
    "swag": _swag_train_flags,  # LoRA with SWAG collected during training (train.py --posterior swag)
}


METHODS: dict[str, Method] = {
    "zero-shot": Method(None, (Variant("zero-shot", "zero-shot (base model)", lambda a: ["--samples", "0"], False),)),
    "lora": Method("lora", (Variant("lora", "LoRA (MAP)", lambda a: ["--samples", "0"]),)),
    "bayeslora": _bayes_method("bayeslora", "bayeslora", "BayesLoRA"),
    "bayeslora_single": _bayes_method("bayeslora_single", "bayeslora-single", "BayesLoRA, one AdamW"),
}


def _laplace_flags(subset: str, prior: str = "marglik") -> Flags:
    def flags(a: argparse.Namespace) -> list[str]:
        out = ["--posterior", "laplace", "--fit_data_path", a.train_slice, "--laplace_subset", subset]
        if prior == "val":  # laplace-lora's second mode: delta from a grid, by the NLL on the validation slice
            out += ["--prior_method", "val", "--val_data_path", a.val_slice]
        return out + (["--fit_limit", str(a.fit_limit)] if a.fit_limit else [])

    return flags


METHODS["laplace"] = Method(  # post hoc on the LoRA adapter: fitted on the training slice, GLM probit predictive
    "lora",
    (
        Variant("laplace:all", "Laplace-LoRA (K-FAC, all)", _laplace_flags("all")),
        Variant("laplace:last_layer", "Laplace-LoRA (K-FAC, last layer)", _laplace_flags("last_layer")),
        Variant(
            "laplace:val",
            "Laplace-LoRA (K-FAC, all, prior on validation)",
            _laplace_flags("all", "val"),
            val_slice=True,
        ),
    ),
)


def _members(recipe: str) -> Flags:
    return lambda a: ["--members", ",".join(a.members_of[recipe])]


def _multiple_of(n: int, m: int) -> int:
    return -(-max(n, 1) // m) * m


# The post-hoc and sampling posteriors on the same adapters: one table with every method.
METHODS["temperature"] = Method(
    "lora",
    (
        Variant(
            "temperature",
            "temperature scaling (MAP)",
            lambda a: ["--posterior", "temperature", "--fit_data_path", a.val_slice],
            val_slice=True,
        ),
    ),
)


METHODS["mc_dropout"] = Method(
    "lora",
    (
        Variant(
            "mc_dropout",
            "MC dropout (N={samples})",
            lambda a: ["--posterior", "mc_dropout", "--samples", str(a.samples)],
        ),
    ),
)


METHODS["ensemble"] = Method(
    "lora",
    (Variant("ensemble", "deep ensemble (M={members})", lambda a: ["--posterior", "ensemble", *_members("lora")(a)]),),
    members="ensemble_size",
)


METHODS["swag"] = Method(
    "swag", (Variant("swag", "SWAG (N={samples})", lambda a: ["--posterior", "swag", "--samples", str(a.samples)]),)
)


METHODS["multiswag"] = Method(
    "swag",
    (
        Variant(
            "multiswag",
            "MultiSWAG (M={members}, N={multiswag_samples})",
            lambda a: [
                "--posterior",
                "multiswag",
                *_members("swag")(a),
                "--samples",
                str(_multiple_of(a.samples, a.ensemble_size)),
            ],
        ),
    ),
    members="ensemble_size",
)


METHODS["tfb"] = Method(
    "lora",
    (
        Variant(
            "tfb",
            "TFB (N={samples})",
            lambda a: [
                "--posterior",
                "tfb",
                "--fit_data_path",
                a.train_slice,
                "--fit_limit",
                str(a.tfb_anchor),
                "--samples",
                str(a.samples),
            ],
        ),
    ),
)


# which posterior's saved state a row stores beside its adapter(s) (the stored-state column)
STORED = {"laplace": "laplace", "temperature": "temperature", "swag": "swag", "multiswag": "swag", "tfb": "tfb"}


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", key)
