"""The ``--posterior`` flags of train.py and evaluate.py, and the fit data of a posterior that needs one.

``--posterior laplace`` fits a Laplace posterior on data (``--fit_data_path``, or right after training the
training data) and saves it next to the adapter (``<adapter>/posterior/laplace``); later evaluations reuse the saved
one. Fit settings (``--laplace_*``, ``--prior_*``) only apply when fitting; ``--link`` / ``--laplace_predictive``
also apply to a saved posterior.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import fields

from peft_bayes.cli.common import comma_list, progress_printer, str2bool
from peft_bayes.errors import InputError
from peft_bayes.evaluation.datasets import load_eval_set
from peft_bayes.models import pad_token_id

POSTERIOR_CHOICES = (
    "auto", "map", "none", "bayeslora", "laplace", "swag", "multiswag", "mc_dropout", "ensemble", "tfb",
    "temperature",
)  # fmt: skip
TRAIN_POSTERIORS = ("none", "laplace", "swag")  # train.py: fitted after (laplace) or collected during (swag) training
FIT_POSTERIORS = ("laplace", "temperature", "tfb")  # fitted on --fit_data_path after training, saved by the adapter
MEMBER_POSTERIORS = ("ensemble", "multiswag")  # --adapter and --members are the member adapters
# --samples N > 0 may apply before the model loads
STOCHASTIC_POSTERIORS = ("laplace", "swag", "multiswag", "mc_dropout", "ensemble", "tfb")
# train.py's SWAG collection flags -> SwagOptions fields (--swag_start is parsed by parse_swag_start)
SWAG_TRAIN_FLAGS = {
    "swag_learning_rate": "learning_rate",
    "swag_anneal_epochs": "anneal_epochs",
    "swag_anneal_strategy": "anneal_strategy",
    "swag_collect_every": "collect_every",
    "swag_max_num_models": "max_num_models",
    "swag_cov_mat": "cov_mat",
}
# flag -> LaplaceOptions field; the fit settings first, then the two that a saved posterior also takes.
FIT_FLAGS = {
    "laplace_subset": "subset",
    "laplace_structure": "structure",
    "laplace_likelihood": "likelihood",
    "laplace_fisher": "fisher",
    "laplace_fisher_samples": "fisher_samples",
    "laplace_kfac": "kfac",
    "prior_method": "prior_method",
    "prior_precision": "prior_precision",
    "prior_per_layer": "prior_per_layer",
    "kfac_rank": "kfac_rank",
    "kfac_threshold": "kfac_threshold",
}
# flags that apply to fitting and to a saved posterior alike
EVAL_FLAGS = {"laplace_predictive": "predictive", "link": "link", "laplace_batch_size": "grad_batch_size"}


def add_posterior_flags(p: argparse.ArgumentParser, training: bool) -> None:
    """Adds the posterior flag group (defaults None: a flag that was not given is distinguishable)."""
    from peft_bayes.posterior.curvature import SUBSETS
    from peft_bayes.posterior.laplace import (
        FISHERS,
        KFAC_MODES,
        LIKELIHOODS,
        LINKS,
        PREDICTIVES,
        PRIOR_METHODS,
        STRUCTURES,
    )

    g = p.add_argument_group("posterior over the adapter weights")
    choices = TRAIN_POSTERIORS if training else POSTERIOR_CHOICES
    g.add_argument(
        "--posterior",
        default="none" if training else "auto",
        choices=choices,
        help="laplace: fit a post-hoc Laplace posterior and save it next to the adapter; swag: collect SWAG moments"
        + (" during training" if training else "; auto: the adapter's own (bayeslora) or map; none = map"),
    )
    _add_swag_tfb_flags(p, training)
    if not training:
        g.add_argument("--fit_data_path", default=None, help="data to fit the posterior on: laplace, a train.json; "
                       "temperature, a validation set with gold answers")  # fmt: skip
        g.add_argument("--members", type=comma_list, default=None, help="ensemble: more member adapter folders "
                       "(comma-separated), beside --adapter")  # fmt: skip
        g.add_argument("--mc_dropout_rate", type=float, default=None, help="mc_dropout: the dropout rate (default: "
                       "the adapter's own)")  # fmt: skip
    g.add_argument("--fit_limit", type=int, default=None, help="fit on the first N examples only")
    g.add_argument("--val_data_path", default=None, help="validation data of --prior_method val")
    g.add_argument(
        "--laplace_subset", default=None, choices=SUBSETS, help="all adapters, or the last adapted module's"
    )
    g.add_argument("--laplace_structure", default=None, choices=STRUCTURES, help="curvature structure (default kron)")
    g.add_argument(
        "--laplace_likelihood", default=None, choices=LIKELIHOODS, help="choice (options) or lm (response tokens); "
        "default: choice for multiple-choice data, else lm",
    )  # fmt: skip
    g.add_argument("--laplace_fisher", default=None, choices=FISHERS, help="default mc")
    g.add_argument("--laplace_fisher_samples", type=int, default=None, help="label samples of the mc Fisher (1)")
    g.add_argument("--laplace_kfac", default=None, choices=KFAC_MODES, help="K-FAC over tokens (default expand)")
    g.add_argument("--kfac_rank", type=int, default=None, help="K-FAC factors wider than --kfac_threshold kept "
                   "as their top-k eigenpairs + one scalar (streamed; default: dense)")  # fmt: skip
    g.add_argument("--kfac_threshold", type=int, default=None, help="width above which --kfac_rank applies (2048)")
    g.add_argument("--prior_method", default=None, choices=PRIOR_METHODS, help="prior precision tuning (marglik)")
    g.add_argument("--prior_precision", type=float, default=None, help="fixed / initial prior precision (1.0)")
    g.add_argument("--prior_per_layer", type=str2bool, nargs="?", const=True, default=None, help="one per weight")
    g.add_argument("--laplace_predictive", default=None, choices=PREDICTIVES, help="glm (default) or nn samples")
    g.add_argument("--link", default=None, choices=LINKS, help="GLM link: probit (default, closed form) or mc")
    g.add_argument(
        "--laplace_batch_size", type=int, default=None, help="examples per differentiable batch of the fit and the "
        "GLM predictive (4; each keeps a forward pass's graph, like a training micro-batch)",
    )  # fmt: skip


def _add_swag_tfb_flags(p: argparse.ArgumentParser, training: bool) -> None:
    from peft_bayes.posterior.swag import ANNEAL_STRATEGIES

    g = p.add_argument_group("SWAG (train.py --posterior swag collects; evaluate.py --posterior swag|multiswag)")
    if training:
        g.add_argument("--swag_start", default=None, help="collect from this epoch (2, 1.5) or step (300steps); "
                       "default: half way through training")  # fmt: skip
        g.add_argument("--swag_learning_rate", type=float, default=None, help="learning rate from the start on "
                       "(default: keep the schedule)")  # fmt: skip
        g.add_argument("--swag_anneal_epochs", type=float, default=None, help="epochs to anneal to it (0)")
        g.add_argument("--swag_anneal_strategy", default=None, choices=ANNEAL_STRATEGIES, help="constant (default)")
        g.add_argument("--swag_collect_every", type=int, default=None, help="collect every N optimizer steps "
                       "(default: once an epoch)")  # fmt: skip
        g.add_argument("--swag_max_num_models", type=int, default=None, help="deviation columns K (20)")
        g.add_argument("--swag_cov_mat", type=str2bool, nargs="?", const=True, default=None, help="low-rank + "
                       "diagonal covariance (true) or diagonal only")  # fmt: skip
        g.add_argument("--swag_export_swa", type=str2bool, nargs="?", const=True, default=None, help="also write "
                       "the SWA mean as a plain PEFT adapter to <output_dir>/swa")  # fmt: skip
    g.add_argument("--swag_sample_scale", type=float, default=None, help="factor on the sample standard deviation "
                   "(1.0; 0: the SWA mean)")  # fmt: skip
    if not training:
        g = p.add_argument_group("training-free Bayesianization (evaluate.py --posterior tfb)")
        g.add_argument("--tfb_epsilon", type=float, default=None, help="relative NLL threshold on the anchor set "
                       "(--fit_data_path) of the sigma search (0.01)")  # fmt: skip
        g.add_argument("--tfb_samples", type=int, default=None, help="posterior draws of the anchor NLL (4)")


def _only_for(args, flags, posteriors: tuple[str, ...]) -> None:
    """A one-line error for the first of ``flags`` given with a ``--posterior`` outside ``posteriors``."""
    stray = [f for f in flags if getattr(args, f, None) is not None]
    if stray and args.posterior not in posteriors:
        names = " / ".join(posteriors)
        raise InputError(f"--{stray[0]} applies to --posterior {names} only (got --posterior {args.posterior})")


def check_posterior_flags(args) -> None:
    """One-line errors for posterior flags that do not apply."""
    _only_for(args, (*FIT_FLAGS, *EVAL_FLAGS, "val_data_path"), ("laplace",))
    _only_for(args, ("fit_data_path", "fit_limit"), FIT_POSTERIORS)
    _only_for(args, ("members",), MEMBER_POSTERIORS)
    _only_for(args, ("mc_dropout_rate",), ("mc_dropout",))
    _only_for(args, ("swag_start", *SWAG_TRAIN_FLAGS, "swag_export_swa"), ("swag",))
    _only_for(args, ("swag_sample_scale",), ("swag", "multiswag"))
    _only_for(args, ("tfb_epsilon", "tfb_samples"), ("tfb",))
    if args.posterior == "swag" and hasattr(args, "swag_collect_every"):  # train.py: the options' own checks
        swag_options(args)
    scale = getattr(args, "swag_sample_scale", None)
    if scale is not None and not (scale >= 0 and scale != float("inf")):
        raise InputError(f"--swag_sample_scale must be a non-negative number, got {scale}")
    if getattr(args, "tfb_epsilon", None) is not None and not args.tfb_epsilon > 0:
        raise InputError(f"--tfb_epsilon must be a positive relative threshold, got {args.tfb_epsilon}")
    if getattr(args, "tfb_samples", None) is not None and args.tfb_samples < 1:
        raise InputError(f"--tfb_samples must be a positive number of draws, got {args.tfb_samples}")
    if args.posterior == "tfb" and not getattr(args, "fit_data_path", None) and not args.adapter:
        raise InputError("--posterior tfb needs --adapter (a trained LoRA adapter)")
    if args.fit_limit is not None and args.fit_limit <= 0:
        raise InputError(f"--fit_limit must be a positive number of examples, got {args.fit_limit}")
    rate = getattr(args, "mc_dropout_rate", None)
    if rate is not None and not 0 <= rate < 1:
        raise InputError(f"--mc_dropout_rate must be in [0, 1), got {rate}")
    if args.posterior in MEMBER_POSTERIORS:
        members = ([args.adapter] if args.adapter else []) + list(args.members or [])
        if len(members) < 2:
            raise InputError(f"--posterior {args.posterior} needs at least two member adapters (--adapter and "
                             f"--members DIR,...), got {len(members)}")  # fmt: skip
    if args.posterior != "laplace":
        return
    fit_path = getattr(args, "fit_data_path", None)
    if fit_path is None and hasattr(args, "fit_data_path"):  # evaluate.py reusing a saved posterior
        fit_only = [f for f in (*FIT_FLAGS, "val_data_path", "fit_limit") if getattr(args, f, None) is not None]
        if fit_only:
            raise InputError(f"--{fit_only[0]} is a fit setting: give --fit_data_path to fit the posterior again")
    if args.prior_method == "val" and not args.val_data_path:
        raise InputError("--prior_method val needs --val_data_path (validation examples with gold answers)")


def laplace_options(args, choice_data: bool):
    """LaplaceOptions from the flags (the dataclass defaults where a flag was not given)."""
    from peft_bayes.posterior import LaplaceOptions

    values = {name: getattr(args, flag) for flag, name in {**FIT_FLAGS, **EVAL_FLAGS}.items()}
    values = {k: v for k, v in values.items() if v is not None}
    values.setdefault("likelihood", "choice" if choice_data else "lm")
    values["seed"] = getattr(args, "seed", 0)
    known = {f.name for f in fields(LaplaceOptions)}
    return LaplaceOptions(**{k: v for k, v in values.items() if k in known})


def fit_batches(path: str, limit, likelihood: str, model, tokenizer, prompter, args, batch_size: int):
    """The fit (or validation) batches of ``path`` for ``likelihood``: multiple-choice examples scored as
    evaluate.py scores them (``--choice_format``, ``--choice_norm``), or the response tokens of each record."""
    from peft_bayes.evaluation.predictive import PairScorer

    name = os.path.splitext(os.path.basename(path))[0]
    if likelihood == "choice":
        fmt, prefix = getattr(args, "choice_format", "label"), getattr(args, "choice_prefix", None)
        data = load_eval_set(name, path, limit, prompter, fmt, *([prefix] if prefix is not None else []))
        if data.task.kind != "choice":
            raise InputError(f"{path}: the choice likelihood needs multiple-choice data; use --laplace_likelihood lm")
        norm = getattr(args, "choice_norm", "none")
        return PairScorer(model, tokenizer, data.pairs, batch_size, "full", norm, data.golds).batches()
    return lm_batches(path, limit, tokenizer, prompter, batch_size, getattr(args, "cutoff_len", 256))


def lm_batches(path: str, limit, tokenizer, prompter, batch_size: int, cutoff_len: int):
    """Right-padded LMBatches of the records' responses (prompt tokens masked out of the labels)."""
    import torch

    from peft_bayes.data import load_records, tokenize_record
    from peft_bayes.posterior import LMBatch
    from peft_bayes.posterior.likelihood import IGNORE

    records = load_records(path, split="train")[:limit]
    rows = [tokenize_record(r, tokenizer, prompter, cutoff_len, False) for r in records]
    pad = pad_token_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[i, :n], mask[i, :n], labels[i, :n] = (
                torch.tensor(r[k]) for k in ("input_ids", "attention_mask", "labels")
            )
        batches.append(LMBatch(ids, mask, labels))
    return batches


def fit_laplace(model, tokenizer, prompter, args, fit_path, folder, choice_data: bool, quiet=False):
    """Fits a Laplace posterior on ``fit_path`` (progress on stdout), tunes its prior, saves it to ``folder``."""
    from peft_bayes.posterior import Laplace
    from peft_bayes.posterior.distributed import barrier, is_main_process

    options = laplace_options(args, choice_data)
    quiet = quiet or not is_main_process()
    posterior = Laplace(model, options)
    size = options.grad_batch_size  # a training-sized batch: the fit keeps the whole graph of a forward pass
    batches = fit_batches(fit_path, args.fit_limit, options.likelihood, model, tokenizer, prompter, args, size)

    progress = progress_printer(f"Laplace fit ({options.structure}, {options.likelihood}), examples", quiet)
    t0 = time.perf_counter()
    posterior.fit(batches, progress)
    if options.prior_method == "val":
        val = fit_batches(args.val_data_path, None, options.likelihood, model, tokenizer, prompter, args, size)
        posterior.tune_prior_on_validation(val)
    posterior.fit_seconds = time.perf_counter() - t0
    if is_main_process():  # under torchrun every rank holds the same posterior; rank 0 writes it
        posterior.save(folder)
    barrier()
    if not quiet:
        prior = ", ".join(f"{v:.4g}" for v in posterior.prior_precision.tolist()[:4])
        if options.kfac_rank is not None:
            mass = min(posterior.captured_mass)
            print(f"low-rank K-FAC factors (rank {options.kfac_rank}): captured eigenvalue mass >= {mass:.4f}")
        print(
            f"Laplace posterior fitted on {posterior.n_data} examples in {posterior.fit_seconds:.1f} s "
            f"(prior precision {prior}{', ...' if posterior.n_priors > 4 else ''}, log marginal likelihood "
            f"{float(posterior.log_marginal_likelihood()):.4g}); saved to {folder}"
        )
    return posterior


def swag_options(args):
    """SwagOptions from train.py's flags (the dataclass defaults where a flag was not given)."""
    from peft_bayes.posterior.swag import SwagOptions, parse_swag_start

    values = {name: getattr(args, flag) for flag, name in SWAG_TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.swag_start is not None:
        values.update(parse_swag_start(args.swag_start))
    if args.swag_sample_scale is not None:
        values["sample_scale"] = args.swag_sample_scale
    return SwagOptions(**values)


def fit_tfb(model, tokenizer, prompter, args, folder: str):
    """TFB on the LoRA of ``model`` with the anchor set ``--fit_data_path``; saves the BayesLoRA adapter to
    ``folder`` and returns its posterior (on a new ``PeftModel`` over the same base model)."""
    from peft_bayes.posterior import BayesLoraPosterior
    from peft_bayes.posterior.tfb import bayesianize, save_tfb

    likelihood = "choice" if is_choice_data(args.fit_data_path) else "lm"
    batches = list(fit_batches(args.fit_data_path, args.fit_limit, likelihood, model, tokenizer, prompter, args, 4))
    extra = {k: v for k, v in (("epsilon", args.tfb_epsilon), ("samples", args.tfb_samples)) if v is not None}
    bayes_model, result = bayesianize(model, batches, seed=args.seed, progress=_progress_line("TFB sigma search",
                                      args.quiet), **extra)  # fmt: skip
    save_tfb(bayes_model, result, folder)
    if not args.quiet:
        print(f"TFB: sigma {result.sigma:.4g} (anchor NLL {result.nll_mean:.4f} -> {result.nll_at_sigma:.4f}, "
              f"threshold {result.threshold:.4f}, {result.n_evals} evaluations); BayesLoRA adapter saved to "
              f"{folder}")  # fmt: skip
    return BayesLoraPosterior(bayes_model)


def load_tfb(model, folder: str):
    """The saved TFB adapter in ``folder`` on the base model of ``model`` (its LoRA adapter unloaded)."""
    from peft import PeftModel

    from peft_bayes.posterior import BayesLoraPosterior
    from peft_bayes.posterior.tfb import load_tfb_result

    load_tfb_result(folder)  # a one-line error when the folder is not a TFB adapter
    bayes = PeftModel.from_pretrained(model.unload(), folder).eval()
    return BayesLoraPosterior(bayes)


def fit_temperature(model, tokenizer, prompter, args, fit_path: str, folder: str | None, choice_data: bool):
    """Fits one temperature on the validation set ``fit_path`` (scored as evaluation scores it), saves it."""
    from peft_bayes.evaluation.predictive import PairScorer
    from peft_bayes.posterior import TemperatureScaling

    if not choice_data:
        raise InputError("--posterior temperature scales option scores: it needs a multiple-choice test set")
    name = os.path.splitext(os.path.basename(fit_path))[0]
    prefix = getattr(args, "choice_prefix", None)
    data = load_eval_set(name, fit_path, args.fit_limit, prompter, args.choice_format, *([prefix] if prefix else []))
    if data.task.kind != "choice":
        raise InputError(f"{fit_path}: temperature scaling needs multiple-choice validation data")
    scorer = PairScorer(model, tokenizer, data.pairs, args.batch_size, args.choice_scoring, args.choice_norm,
                        data.golds)  # fmt: skip
    posterior = TemperatureScaling(model)
    posterior.fit(scorer, _progress_line("temperature fit", args.quiet))
    if folder:
        posterior.save(folder)
    if not args.quiet:
        saved = f"; saved to {folder}" if folder else ""
        print(f"temperature {posterior.temperature:.4g} fitted on {posterior.n_data} examples (validation NLL "
              f"{posterior.nll_before:.4f} -> {posterior.nll_after:.4f}){saved}")  # fmt: skip
    return posterior


def _progress_line(label: str, quiet: bool):
    return progress_printer(label, quiet)


def resolve_posterior(args, model, tokenizer, prompter, choice_data: bool):
    """The posterior evaluate.py evaluates with (see the module docstring); evaluation runs on its ``model``."""
    from peft_bayes.posterior import (
        BayesLoraPosterior,
        Ensemble,
        MCDropout,
        MultiSwag,
        PointEstimate,
        default_posterior,
        load_posterior,
    )
    from peft_bayes.posterior.base import posterior_folder

    if args.posterior == "auto":
        return default_posterior(model)
    if args.posterior == "map":
        return PointEstimate(model)
    if args.posterior == "bayeslora":
        return BayesLoraPosterior(model)
    if args.posterior == "mc_dropout":
        return MCDropout(model, rate=args.mc_dropout_rate)
    members = ([args.adapter] if args.adapter else []) + list(getattr(args, "members", None) or [])
    if args.posterior == "ensemble":  # the model was loaded without --adapter: every member joins it by name
        return Ensemble.from_folders(model, members)
    if args.posterior == "multiswag":
        posterior = MultiSwag.from_folders(model, members)
        if args.swag_sample_scale is not None:
            posterior.sample_scale = args.swag_sample_scale
        return posterior
    if args.posterior in ("swag", "tfb") and not args.adapter:
        raise InputError(f"--posterior {args.posterior} needs --adapter (the posterior is over its weights)")
    if args.posterior == "swag":
        folder = posterior_folder(args.adapter, "swag")
        if not os.path.isdir(folder):
            raise InputError(f"no saved SWAG posterior in {folder}: train with train.py --posterior swag")
        posterior = load_posterior(model, folder)
        if args.swag_sample_scale is not None:
            posterior.sample_scale = args.swag_sample_scale
        return posterior
    if args.posterior == "tfb":
        folder = posterior_folder(args.adapter, "tfb")
        if args.fit_data_path:
            return fit_tfb(model, tokenizer, prompter, args, folder)
        if not os.path.isdir(folder):
            raise InputError(f"no saved TFB adapter in {folder}: give --fit_data_path (an anchor set) to make one")
        return load_tfb(model, folder)
    if args.posterior == "temperature":
        folder = posterior_folder(args.adapter, "temperature") if args.adapter else None
        if args.fit_data_path:
            return fit_temperature(model, tokenizer, prompter, args, args.fit_data_path, folder, choice_data)
        if folder is None or not os.path.isdir(folder):
            where = f"in {folder}" if folder else "for the base model (no --adapter)"
            raise InputError(f"no saved temperature {where}: give --fit_data_path (a validation set) to fit one")
        return load_posterior(model, folder)
    if not args.adapter:
        raise InputError("--posterior laplace needs --adapter (the posterior is over the adapter's weights)")
    folder = posterior_folder(args.adapter, "laplace")
    if args.fit_data_path:
        return fit_laplace(model, tokenizer, prompter, args, args.fit_data_path, folder, choice_data, args.quiet)
    if not os.path.isdir(folder):
        raise InputError(f"no saved Laplace posterior in {folder}: give --fit_data_path to fit one")
    posterior = load_posterior(model, folder)
    for flag, name in EVAL_FLAGS.items():
        if getattr(args, flag) is not None:
            setattr(posterior.options, name, getattr(args, flag))
    return posterior


def is_choice_data(path: str) -> bool:
    """Whether the records of ``path`` are multiple choice (they have gold ``answer`` labels among options)."""
    from peft_bayes.data import load_records
    from peft_bayes.data.answers import infer_task

    try:
        records = load_records(path, required=("instruction", "answer"), split="train")
    except InputError:
        return False  # no gold answers: generation data
    return infer_task(records, os.path.splitext(os.path.basename(path))[0]).kind == "choice"
