"""The ``--posterior`` flags of train.py and evaluate.py, read off the posterior table.

Everything about one posterior (its names, the flags it adds and accepts, its checks, how it is fitted, loaded or
collected, its summary) is declared by its class in ``peft_bayes.posterior``; this module holds no list of
posteriors. It adds the flags every posterior shares (``--posterior``, ``--fit_data_path``, ``--fit_limit``,
``--members``), rejects a flag given with a posterior that does not accept it, and hands the posterior classes a
``Workflow`` with the evaluation layer's data builders.
"""

from __future__ import annotations

import argparse

from peft_bayes.arguments import comma_list
from peft_bayes.errors import InputError
from peft_bayes.evaluation.fit_data import choice_scorer, fit_batches
from peft_bayes.io import progress_printer
from peft_bayes.posterior import POSTERIORS, Posterior, Workflow, posterior_class
from peft_bayes.posterior.base import member_folders

SHARED_FLAGS = ("fit_data_path", "fit_limit", "members")


def _table(training: bool) -> list[type[Posterior]]:
    return [cls for cls in POSTERIORS.values() if cls.train_time or not training]


def posterior_choices(training: bool) -> list[str]:
    """``--posterior``'s choices, in table order: train.py's are the posteriors it makes."""
    return [name for cls in _table(training) for name in (cls.name, *cls.aliases)]


def add_posterior_flags(p: argparse.ArgumentParser, training: bool) -> None:
    """Adds ``--posterior``, the shared flags and every posterior's own (defaults None: a flag that was not given
    is distinguishable)."""
    g = p.add_argument_group("posterior over the adapter weights")
    g.add_argument(
        "--posterior",
        default="none" if training else "auto",
        choices=posterior_choices(training),
        help="laplace: fit a post-hoc Laplace posterior and save it next to the adapter; swag: collect SWAG moments"
        + (" during training" if training else "; auto: the adapter's own (bayeslora) or map; none = map"),
    )
    if not training:
        g.add_argument(
            "--fit_data_path",
            default=None,
            help="data to fit the posterior on: laplace, a train.json; "
            "temperature, a validation set with gold answers; tfb, an anchor set",
        )
        g.add_argument(
            "--members",
            type=comma_list,
            default=None,
            help="ensemble / multiswag: more member adapter folders (comma-separated), beside --adapter",
        )
    g.add_argument("--fit_limit", type=int, default=None, help="fit on the first N examples only")
    for cls in _table(training):
        cls.add_flags(p, training)


def _owned_flags() -> list[str]:
    """Every flag a posterior accepts, in table order, each once."""
    return list(dict.fromkeys([*SHARED_FLAGS, *(f for cls in POSTERIORS.values() for f in cls.accepts)]))


def check_posterior_flags(args) -> None:
    """One-line errors for posterior flags that do not apply to ``--posterior``, then the posterior's own checks."""
    cls = posterior_class(args.posterior)
    args.posterior = cls.name  # an alias (train.py's none) becomes the table's name
    for flag in _owned_flags():
        if getattr(args, flag, None) is not None and flag not in cls.accepts:
            names = " / ".join(c.name for c in POSTERIORS.values() if flag in c.accepts)
            raise InputError(f"--{flag} applies to --posterior {names} only (got --posterior {args.posterior})")
    if args.fit_limit is not None and args.fit_limit <= 0:
        raise InputError(f"--fit_limit must be a positive number of examples, got {args.fit_limit}")
    if cls.member_adapters:
        members = member_folders(args)
        if len(members) < 2:
            raise InputError(
                f"--posterior {args.posterior} needs at least two member adapters (--adapter and "
                f"--members DIR,...), got {len(members)}"
            )
    cls.check_args(args)


def workflow(args, model, tokenizer, prompter, choice_data: bool) -> Workflow:
    """What the posterior classes get to fit, load or save themselves, with this layer's data builders."""
    return Workflow(
        args=args,
        model=model,
        tokenizer=tokenizer,
        prompter=prompter,
        choice_data=choice_data,
        batches=lambda path, limit, likelihood, size: fit_batches(
            path, limit, likelihood, model, tokenizer, prompter, args, size
        ),
        scorer=lambda path, limit: choice_scorer(path, limit, model, tokenizer, prompter, args),
        progress=lambda label: progress_printer(label, getattr(args, "quiet", False)),
        quiet=getattr(args, "quiet", False),
    )


def resolve_posterior(args, model, tokenizer, prompter, choice_data: bool) -> Posterior:
    """The posterior evaluate.py evaluates with; evaluation runs on its ``model``."""
    return posterior_class(args.posterior).from_args(workflow(args, model, tokenizer, prompter, choice_data))
