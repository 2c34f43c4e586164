"""Post-hoc Laplace over the weight matrices of any adapter (Laplace-LoRA, Yang et al. 2024; Laplace-Adapters).

A Gaussian ``N(θ*, P⁻¹)`` around the trained adapter weights θ*, with precision ``P = H + δ I``: H the curvature of
the log-likelihood on the fit data (``structure``: K-FAC ``kron``, ``diag`` or dense ``full``), δ the prior
precision (one scalar or one per weight), tuned by the log marginal likelihood (closed form through the blocks'
eigenvalues) or by the NLL on validation data. Predictions go through the linearised model (``glm``: the option
scores' mean and covariance ``J P⁻¹ Jᵀ``, with a pairwise probit or Monte-Carlo link) or through weight samples
(``nn``, also used for generation). The likelihood is ``choice`` (a categorical over each example's options, scored
exactly as evaluation scores them) or ``lm`` (the response tokens).

Parameters that are not weight matrices (biases, DoRA's magnitudes, learned scales) stay at their trained values.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch

from peft_bayes.errors import InputError
from peft_bayes.options import (
    OptionEnum,
    add_option_flags,
    coerce_enums,
    flags_of,
    option,
    option_values,
    options_from_args,
    require,
    with_flag_names,
)
from peft_bayes.posterior.base import (
    OptionScorer,
    Posterior,
    posterior_folder,
    require_adapter,
    swapped_weights,
    weights_fingerprint,
)
from peft_bayes.posterior.curvature import (
    Recorder,
    Site,
    Subset,
    adapter_sites,
    per_unit_gradients,
    rows_tokens,
    stats_dtype,
)
from peft_bayes.posterior.distributed import barrier, is_main_process, shard, sum_scalars
from peft_bayes.posterior.fisher import CurvatureAccumulator, backward_vectors
from peft_bayes.posterior.likelihood import ChoiceBatch, LMBatch, row_scores, scores_matrix
from peft_bayes.posterior.lowrank import LowRankKronBlock
from peft_bayes.posterior.structures import CurvatureBlock, DenseBlock, DiagBlock, KronBlock


class Structure(OptionEnum):
    KRON = "kron"
    DIAG = "diag"
    FULL = "full"


class Likelihood(OptionEnum):
    CHOICE = "choice"
    LM = "lm"


class Fisher(OptionEnum):
    EMPIRICAL = "empirical"
    MC = "mc"
    EXACT = "exact"


class KfacMode(OptionEnum):
    EXPAND = "expand"
    REDUCE = "reduce"


class PriorMethod(OptionEnum):
    MARGLIK = "marglik"
    VAL = "val"
    FIXED = "fixed"


class Link(OptionEnum):
    PROBIT = "probit"
    MC = "mc"


class Predictive(OptionEnum):
    GLM = "glm"
    NN = "nn"


BLOCK_TYPES: dict[str, type[CurvatureBlock]] = {
    "kron": KronBlock,
    "kron_lowrank": LowRankKronBlock,
    "diag": DiagBlock,
    "full": DenseBlock,
}
PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-12, 25))  # 1e-3 ... 1e6, four per decade

Progress = Callable[[int, int], None]


@dataclass
class LaplaceOptions:
    """Settings of a Laplace posterior. ``stage="fit"`` fields shape the fit (a saved posterior keeps them);
    ``stage="eval"`` fields only how it predicts, and may be changed when a saved one is reused."""

    subset: Subset = option(
        Subset.ALL, "all adapters, or the last adapted module's", flag="laplace_subset", stage="fit"
    )
    structure: Structure = option(Structure.KRON, "curvature structure", flag="laplace_structure", stage="fit")
    likelihood: Likelihood = option(
        Likelihood.CHOICE,
        "choice (a categorical over the options) or lm (the response tokens)",
        flag="laplace_likelihood",
        stage="fit",
        default_text="choice for multiple-choice data, else lm",
    )
    fisher: Fisher = option(
        Fisher.MC,
        "curvature: empirical Fisher, mc (sampled labels) or exact (every option)",
        flag="laplace_fisher",
        stage="fit",
    )
    kfac: KfacMode = option(KfacMode.EXPAND, "K-FAC over tokens", flag="laplace_kfac", stage="fit")
    fisher_samples: int = option(
        1, "label samples per example of the mc Fisher", flag="laplace_fisher_samples", stage="fit"
    )
    prior_precision: float = option(
        1.0, "fixed / initial prior precision (the start of the marglik search)", stage="fit"
    )
    prior_method: PriorMethod = option(PriorMethod.MARGLIK, "prior precision tuning", stage="fit")
    prior_per_layer: bool = option(False, "one prior precision per weight matrix", stage="fit")
    predictive: Predictive = option(
        Predictive.GLM, "glm (linearised) or nn (weight samples)", flag="laplace_predictive", stage="eval"
    )
    link: Link = option(Link.PROBIT, "GLM link: probit (closed form) or mc", stage="eval")
    seed: int = option(0, "label sampling of the mc Fisher (the scripts: --seed)", flag=False)
    kfac_rank: int | None = option(
        None,
        "K-FAC factors wider than --kfac_threshold kept as their top-k eigenpairs "
        "+ one scalar (streamed; default: dense)",
        stage="fit",
    )
    kfac_threshold: int = option(2048, "width above which --kfac_rank applies", stage="fit")
    grad_batch_size: int = option(
        4,
        "examples per differentiable batch of the fit (each keeps a forward pass's graph, like a training "
        "micro-batch)",
        flag="laplace_batch_size",
        stage="eval",
    )
    glm_batch_size: int = option(
        2,
        "examples per differentiable batch of the GLM predictive: each keeps the graph of its options' rows until "
        "their Jacobians are contracted (SmolLM2-135M, ARC-Easy: peak memory 1.06 / 1.31 / 2.10x the MAP's at "
        "1 / 2 / 4)",
        flag="laplace_glm_batch_size",
        stage="eval",
    )

    def __post_init__(self) -> None:
        coerce_enums(self)
        p = self.prior_precision
        require(p > 0 and math.isfinite(p), f"`prior_precision` must be a positive number, got {p}")
        require(
            self.kfac_rank is None or (self.kfac_rank >= 1 and self.structure == "kron"),
            f"`kfac_rank` needs `structure` kron and a positive rank, got {self.kfac_rank}",
        )
        require(self.kfac_threshold >= 1, f"`kfac_threshold` must be a positive width, got {self.kfac_threshold}")
        for name in ("grad_batch_size", "glm_batch_size"):
            size = getattr(self, name)
            require(size >= 1, f"`{name}` must be a positive number of examples, got {size}")
        require(self.fisher_samples >= 1, f"`fisher_samples` must be positive, got {self.fisher_samples}")
        require(
            self.fisher != "exact" or self.likelihood == "choice",
            "`fisher` exact needs `likelihood` choice (every option is a class)",
        )
        require(
            not (self.prior_per_layer and self.structure == "full"),
            "`prior_per_layer` needs `structure` kron or diag (full is one block)",
        )
        require(
            not (self.prior_per_layer and self.prior_method == "val"),
            "`prior_per_layer` is tuned by `prior_method` marglik (val searches one scalar)",
        )


def sites_fingerprint(sites: Sequence[Site]) -> str:
    """The fingerprint of the site weights, each after its module name, in module order."""
    return weights_fingerprint([s.weight for s in sites], [s.name for s in sites])


class Laplace(Posterior):
    """Laplace posterior over the adapter weight matrices of a ``PeftModel`` (see the module docstring)."""

    name: ClassVar[str] = "laplace"
    accepts: ClassVar[tuple[str, ...]] = (*flags_of(LaplaceOptions), "val_data_path", "fit_data_path", "fit_limit")
    train_time: ClassVar[bool] = True  # train.py --posterior laplace: fitted on the training data after training

    def __init__(self, model, options: LaplaceOptions | None = None, **kwargs) -> None:
        super().__init__(model)
        self.options = options if options is not None else LaplaceOptions(**kwargs)
        self.sites = adapter_sites(model, self.options.subset)
        self.blocks: list[CurvatureBlock] | None = None
        self.prior_precision = torch.full((self.n_priors,), float(self.options.prior_precision), dtype=torch.float64)
        self.n_data = 0
        self.loglik = 0.0
        self.fingerprint: str | None = None
        self.captured_mass: list[float] = [1.0] * len(self.sites)  # per site, with low-rank factors

    # --- sizes ---------------------------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return 1 if self.options.structure == "full" else len(self.sites)

    @property
    def n_priors(self) -> int:
        return self.n_blocks if self.options.prior_per_layer else 1

    @property
    def n_params(self) -> int:
        return sum(s.weight.numel() for s in self.sites)

    @property
    def is_fitted(self) -> bool:
        return self.blocks is not None

    def _require_fit(self) -> list[CurvatureBlock]:
        if self.blocks is None:
            raise InputError("the Laplace posterior is not fitted: fit it on data first (--fit_data_path)")
        return self.blocks

    def _deltas(self, prior: torch.Tensor | None = None) -> list[torch.Tensor]:
        prior = self.prior_precision if prior is None else prior
        return [prior[b if self.options.prior_per_layer else 0] for b in range(self.n_blocks)]

    def _block_means(self) -> list[torch.Tensor]:
        flat = [s.weight.detach().to(torch.float64).cpu().flatten() for s in self.sites]
        return [torch.cat(flat)] if self.options.structure == "full" else flat

    # --- fitting ------------------------------------------------------------------------------------------------
    def fit(self, data: Iterable[ChoiceBatch | LMBatch], progress: Progress | None = None) -> None:
        """Accumulates the curvature over ``data`` (batches of the ``likelihood``'s kind) in eval mode, then tunes
        the prior precision by the marginal likelihood unless ``prior_method`` is ``fixed`` or ``val``.

        Under ``torchrun`` (an initialised process group) every rank passes the same ``data``, accumulates the
        batches ``rank, rank + world, ...`` and the sums are all-reduced: every rank ends with the posterior of the
        whole data (``progress`` counts this rank's examples). The mc Fisher's label draws are seeded per batch, so
        they do not depend on which rank runs a batch.
        """
        opts = self.options
        acc, loglik, seen = self.accumulate(data, progress)
        acc.all_reduce()
        loglik, seen = sum_scalars([loglik, seen])
        if not math.isfinite(loglik):
            raise InputError(f"the log-likelihood of the fit data is not finite ({loglik}): check the adapter")
        self.blocks = [b.eigendecompose() for b in acc.blocks()]
        self.captured_mass = acc.kron.captured_mass() if opts.structure == "kron" else [1.0] * len(self.sites)
        self.n_data, self.loglik, self.fingerprint = int(seen), loglik, sites_fingerprint(self.sites)
        if opts.prior_method == "marglik":
            self.optimize_prior_precision()

    def accumulate(self, data: Iterable[ChoiceBatch | LMBatch], progress: Progress | None = None):
        """The curvature pass of ``fit`` over this rank's share of ``data``: forward, the Fisher's backward vectors
        and the statistics of every site (no all-reduce, eigendecomposition or prior search).

        Returns:
            ``(CurvatureAccumulator, log-likelihood, examples seen)`` of this rank.
        """
        data = list(data)
        opts = self.options
        acc = CurvatureAccumulator(
            self.sites,
            opts.structure,
            opts.kfac == "reduce",
            stats_dtype(self.sites),
            opts.kfac_rank,
            opts.kfac_threshold,
        )
        mine = shard(list(enumerate(data)))
        total = sum(b.n_examples for _, b in mine)
        loglik, seen = 0.0, 0
        with _eval_mode(self.model), Recorder(self.sites) as rec:
            for index, batch in mine:
                generator = torch.Generator().manual_seed(opts.seed * 1_000_003 + index)
                outputs, mask, unit, n_units, nll, vectors = backward_vectors(self.model, batch, opts, generator)
                acc.forward(rec, mask, unit, n_units)
                if isinstance(batch, ChoiceBatch):  # independent rows: one backward for every vector
                    acc.backward_rows(rec, outputs, vectors, mask, unit, n_units)
                else:
                    for weight, vector in vectors:
                        acc.backward(rec, outputs, vector, weight, mask, unit, n_units)
                loglik -= float(nll)
                seen += batch.n_examples
                if progress:
                    progress(seen, total)
        return acc, loglik, seen

    def log_marginal_likelihood(self, prior_precision: torch.Tensor | None = None) -> torch.Tensor:
        """log p(D) ≈ log p(D | θ*) - ½ (log det P - log det δI) - ½ θ*ᵀ δ θ* (prior mean 0), differentiable in
        ``prior_precision`` ((1,) or one per block)."""
        blocks = self._require_fit()
        deltas = self._deltas(prior_precision)
        logdet_ratio = sum(b.logdet(d) - b.numel * torch.log(d) for b, d in zip(blocks, deltas))
        scatter = sum(d * m.pow(2).sum() for d, m in zip(deltas, self._block_means()))
        return self.loglik - 0.5 * logdet_ratio - 0.5 * scatter

    def optimize_prior_precision(self, steps: int = 300, lr: float = 0.1) -> torch.Tensor:
        """Maximises the log marginal likelihood over log δ (Adam, as laplace-torch does); returns δ."""
        log_prior = self.prior_precision.log().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([log_prior], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -self.log_marginal_likelihood(log_prior.exp())
            loss.backward()
            optimizer.step()
        self.prior_precision = log_prior.detach().exp()
        return self.prior_precision

    def tune_prior_on_validation(self, data: Iterable[ChoiceBatch], grid: Sequence[float] = PRIOR_GRID) -> float:
        """Picks the scalar δ of ``grid`` with the lowest NLL of the GLM predictive on ``data`` (laplace-lora's
        validation mode); the Jacobians are computed once for the whole grid."""
        self._require_fit()
        deltas = [torch.full((1,), float(d), dtype=torch.float64) for d in grid]
        nll = torch.zeros(len(grid), dtype=torch.float64)
        for batch in data:
            f, covs = self.glm_moments(batch, deltas)
            labels = batch.labels.to(f.device)
            if (labels < 0).any():
                raise InputError("--prior_method val needs the gold answer of every validation example")
            for g, cov in enumerate(covs):
                probs = glm_probabilities(f, cov, "probit")
                nll[g] -= probs.gather(1, labels[:, None]).clamp_min(1e-300).log().sum()
        best = int(nll.argmin())
        self.prior_precision = deltas[best].clone()
        return float(grid[best])

    # --- predictive ---------------------------------------------------------------------------------------------
    def glm_moments(self, batch: ChoiceBatch, priors: Sequence[torch.Tensor] | None = None):
        """(f (B, K) option scores at θ*, [Σ_f (B, K, K) per prior]) of the linearised model, computed in eval mode
        (no dropout, BayesLoRA's mean); ``priors``: prior precisions to evaluate (default: the fitted one)."""
        blocks = self._require_fit()
        priors = [self.prior_precision] if priors is None else priors
        dtype = stats_dtype(self.sites)
        with _eval_mode(self.model), Recorder(self.sites) as rec, torch.enable_grad():
            rows = row_scores(self.model, batch)
            f = scores_matrix(rows, batch)
            B, K = f.shape
            # Option k of example n is row r alone: one backward of the summed rows gives every row's gradient.
            grads = rec.output_grads(rows, torch.ones_like(rows))
            R, device = batch.input_ids.shape[0], rows.device
            mask, row_index = batch.attention_mask.to(device), torch.arange(R, device=device)
            index = (batch.example.to(device), batch.option.to(device))
            jacs = []  # per site: (B, K, out, in), zero where an example has no option k
            for a, g in zip(rec.inputs, grads):
                per_row = per_unit_gradients(rows_tokens(a, R), rows_tokens(g, R), mask, row_index, R, dtype)
                jacs.append(per_row.new_zeros((B, K, *per_row.shape[1:])).index_put_(index, per_row))
        if self.options.structure == "full":
            jacs = [torch.cat([j.flatten(2) for j in jacs], -1)]  # (B, K, P)
        covs = []
        for prior in priors:
            deltas = self._deltas(prior)
            cov = sum(
                blk.inv_quad(j.to(blk.dtype).to(blk.device), d.to(blk.dtype)).cpu()
                for blk, j, d in zip(blocks, jacs, deltas)
            )
            covs.append(cov.to(torch.float64))
        return f.detach().to(torch.float64).cpu(), covs

    def resolve_samples(self, requested: int | None) -> int:
        """Auto: 0 with the probit link (closed form), 100 draws of the scores with the mc link, 10 weight samples
        with the nn predictive."""
        if requested is not None:
            return requested
        if self.options.predictive == "nn":
            return 10
        return 0 if self.options.link == "probit" else 100

    def option_probs(self, scorer: OptionScorer, samples: int, seed: int, progress: Progress | None = None):
        if self.options.predictive == "nn":
            return super().option_probs(scorer, samples, seed, progress)
        out: list[torch.Tensor | None] = [None] * scorer.n_examples
        generator = torch.Generator().manual_seed(seed)
        done = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in scorer.batches(self.options.glm_batch_size):
                f, (cov,) = self.glm_moments(batch)
                probs = glm_probabilities(f, cov, self.options.link, max(samples, 1), generator)
                for row, index in enumerate(batch.index.tolist()):
                    valid = torch.isfinite(f[row])
                    out[index] = probs[row][valid]
                done += batch.n_examples
                if progress:
                    progress(done, scorer.n_examples)
        finally:
            self.model.train(was_training)
        return out

    def sample(self, seed: int):
        """Context with one weight sample θ* + ε, ε ~ N(0, P⁻¹) drawn from ``seed``; the weights are restored."""
        return _perturbed(self, seed)

    def draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        """One ε per site (its weight's shape) from N(0, P⁻¹)."""
        blocks = self._require_fit()
        draws = [b.sample(d.to(b.dtype), generator=generator) for b, d in zip(blocks, self._deltas())]
        if self.options.structure == "full":
            draws = list(draws[0].split([s.weight.numel() for s in self.sites]))
        return [d.reshape(s.shape) for d, s in zip(draws, self.sites)]

    # --- the scripts: flags, fit after training or on --fit_data_path, a saved one ---------------------------
    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        g = parser.add_argument_group("Laplace (train.py and evaluate.py --posterior laplace)")
        g.add_argument("--val_data_path", default=None, help="validation data of --prior_method val")
        add_option_flags(g, LaplaceOptions)

    @classmethod
    def check_args(cls, args) -> None:
        fit_path = getattr(args, "fit_data_path", None)
        if fit_path is None and hasattr(args, "fit_data_path"):  # evaluate.py reusing a saved posterior
            fit_flags = [*flags_of(LaplaceOptions, stage="fit"), "val_data_path", "fit_limit"]
            fit_only = [f for f in fit_flags if getattr(args, f, None) is not None]
            if fit_only:
                raise InputError(f"--{fit_only[0]} is a fit setting: give --fit_data_path to fit the posterior again")
        if args.prior_method == "val" and not args.val_data_path:
            raise InputError("--prior_method val needs --val_data_path (validation examples with gold answers)")
        cls.options_from_args(args, choice_data=True)  # the options' own checks, naming the flags

    @staticmethod
    def options_from_args(args, choice_data: bool) -> LaplaceOptions:
        """LaplaceOptions from the flags (the dataclass defaults where a flag was not given)."""
        likelihood = getattr(args, "laplace_likelihood", None) or ("choice" if choice_data else "lm")
        return options_from_args(LaplaceOptions, args, likelihood=likelihood, seed=getattr(args, "seed", 0))

    @classmethod
    def fit_and_save(cls, work, fit_path: str, folder: str) -> Laplace:
        """Fits on ``fit_path`` (progress lines unless quiet), tunes the prior, saves to ``folder`` (rank 0)."""
        import time

        args = work.args
        options = cls.options_from_args(args, work.choice_data)
        quiet = work.quiet or not is_main_process()
        posterior = cls(work.model, options)
        size = options.grad_batch_size  # a training-sized batch: the fit keeps the whole graph of a forward pass
        batches = work.batches(fit_path, args.fit_limit, options.likelihood, size)
        t0 = time.perf_counter()
        posterior.fit(
            batches,
            None if quiet else work.progress(f"Laplace fit ({options.structure}, {options.likelihood}), examples"),
        )
        if options.prior_method == "val":
            posterior.tune_prior_on_validation(work.batches(args.val_data_path, None, options.likelihood, size))
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

    @classmethod
    def from_args(cls, work) -> Laplace:
        args = work.args
        folder = posterior_folder(require_adapter(args, cls.name), cls.name)
        if args.fit_data_path:
            return cls.fit_and_save(work, args.fit_data_path, folder)
        if not os.path.isdir(folder):
            raise InputError(f"no saved Laplace posterior in {folder}: give --fit_data_path to fit one")
        posterior = cls.load_saved(work.model, folder)
        changes = option_values(LaplaceOptions, args, stage="eval")  # how it predicts may change; not the fit
        posterior.options = with_flag_names(LaplaceOptions, lambda: replace(posterior.options, **changes))
        return posterior

    @classmethod
    def after_training(cls, work, collector) -> None:
        """train.py --posterior laplace: fitted on the training data (``--fit_limit``), saved next to the adapter."""
        cls.fit_and_save(work, work.args.data_path, posterior_folder(work.args.output_dir, cls.name))

    def summary(self) -> dict:
        out = {**self.config()["options"], "n_fit": self.n_data, "prior_precision": self.prior_precision.tolist()}
        if hasattr(self, "fit_seconds"):
            out["fit_seconds"] = round(self.fit_seconds, 3)
        return {"posterior": self.name, "laplace": out}

    # --- persistence --------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "options": asdict(self.options),
            "sites": [[s.name, list(s.shape)] for s in self.sites],
            "n_data": self.n_data,
            "loglik": self.loglik,
            "fingerprint": self.fingerprint,
            "prior_precision": self.prior_precision.tolist(),
            "log_marginal_likelihood": float(self.log_marginal_likelihood()),
            "block_kinds": [b.kind for b in self._require_fit()],
            "captured_mass": self.captured_mass,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"prior_precision": self.prior_precision}
        for b, block in enumerate(self._require_fit()):
            state.update({f"block{b}.{k}": v for k, v in block.state_dict().items()})
        return state

    @classmethod
    def from_config(cls, model, config: dict) -> Laplace:
        try:
            options = LaplaceOptions(**config["options"])
        except (KeyError, TypeError) as err:
            raise InputError(f"saved Laplace posterior: unreadable options ({err})") from None
        return cls(model, options)

    def load_state_dict(self, state: dict[str, torch.Tensor], config: dict) -> None:
        saved = [(n, tuple(s)) for n, s in config.get("sites", [])]
        if saved != [(s.name, s.shape) for s in self.sites]:
            raise InputError("the saved Laplace posterior covers other adapter weights (sites differ): refit it")
        if config.get("fingerprint") != sites_fingerprint(self.sites):
            raise InputError(
                "the saved Laplace posterior was fitted on other adapter weights (fingerprint differs): refit it "
                "with --fit_data_path"
            )
        kinds = config.get("block_kinds") or [self.options.structure] * self.n_blocks
        device = self.sites[0].weight.device
        self.blocks = []
        for b in range(self.n_blocks):
            block_type = BLOCK_TYPES[kinds[b]]
            part = {k.split(".", 1)[1]: v.to(device) for k, v in state.items() if k.startswith(f"block{b}.")}
            self.blocks.append(block_type.from_state_dict(part).eigendecompose())
        self.prior_precision = state["prior_precision"].to(torch.float64)
        self.n_data, self.loglik, self.fingerprint = config["n_data"], config["loglik"], config["fingerprint"]
        self.captured_mass = config.get("captured_mass", [1.0] * len(self.sites))


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _perturbed(laplace: Laplace, seed: int) -> contextlib.AbstractContextManager:
    """The site weights moved by one draw of the posterior (seeded), restored on exit."""
    eps = laplace.draw(torch.Generator().manual_seed(seed))
    weights = [s.weight for s in laplace.sites]
    return swapped_weights(weights, [w + e.to(device=w.device, dtype=w.dtype) for w, e in zip(weights, eps)])


def glm_probabilities(
    f: torch.Tensor, cov: torch.Tensor, link: str, samples: int = 100, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, K) predictive probabilities of option scores ``f`` (B, K; ``-inf`` = no option) with covariance ``cov``
    (B, K, K): the pairwise probit approximation, or the average softmax of ``samples`` draws f + L z (``mc``).

    Pairwise probit: softmax_k(f) = 1 / Σ_j exp(-(f_k - f_j)), and each difference is scaled by MacKay's factor
    1 / sqrt(1 + π/8 Var(f_k - f_j)) with Var(f_k - f_j) = Σ_kk + Σ_jj - 2 Σ_kj (the mean-field approximation of
    Lu, Ie and Sha 2020, here with the correlations), then renormalised. Like the exact Gaussian predictive, it does
    not change when every score moves by the same amount, nor under covariance that only shifts all scores together
    — the per-class softmax(f / sqrt(1 + π/8 Σ_kk)) does both, which on option log-likelihoods (large and negative)
    favours whichever option has the largest variance. With two options it is MacKay's probit of the difference."""
    valid = torch.isfinite(f)
    f0 = torch.where(valid, f, torch.zeros_like(f))
    if link == "probit":
        diag = torch.diagonal(cov, dim1=-2, dim2=-1)
        var = (diag[..., :, None] + diag[..., None, :] - 2 * cov).clamp_min(0)  # (B, K, K): Var(f_k - f_j)
        diff = (f0[..., :, None] - f0[..., None, :]) / torch.sqrt(1 + math.pi / 8 * var)
        log_p = -torch.logsumexp((-diff).masked_fill(~valid[..., None, :], float("-inf")), dim=-1)
        return log_p.masked_fill(~valid, float("-inf")).softmax(-1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    root = eigvecs * eigvals.clamp_min(0).sqrt()[..., None, :]  # (B, K, K), root rootᵀ = cov
    z = torch.randn((samples, *f.shape), generator=generator, dtype=f.dtype)
    draws = f0 + torch.einsum("bkj,sbj->sbk", root, z)
    return draws.masked_fill(~valid, float("-inf")).softmax(-1).mean(0)
