"""Training-free Bayesianization (TFB; Shi et al., "Training-Free Bayesianization for Low-Rank Adapters of Large
Language Models", 2024): a trained LoRA adapter turned into a BayesLoRA adapter without any training.

Per LoRA layer, with B (out x r) = U diag(d) Vᵀ (thin SVD, computed in float64):

    B' = U diag(d)      (out x r)        A' = Vᵀ A      (r x in)        so  B' A' = B A,

and the Gaussian over A' has std ``sigma_ij = sigma / d_i`` on row i, one ``sigma`` for the whole model. A sample
``A' + diag(sigma / d) E`` gives the update ``s (B A + sigma U E)``: noise of std ``sigma`` in every direction of
B's column space, the paper's low-rank isotropic family. The mean is the original LoRA, up to the cast of B', A'
to the adapter's dtype (exact in float64).

Rule for ``d_i = 0`` (a rank-deficient B, or out < r): singular values are clamped from below at
``SINGULAR_FLOOR * max(d)`` of their layer for the std only, ``sigma_ij = sigma / max(d_i, floor)``. The rows
concerned have (near) zero columns in B', so their noise reaches the output scaled by ``d_i / floor <= 1``: no
direction ever gets more than ``sigma``, and every std stays finite. A layer whose B is exactly zero (an untrained
adapter) is an error.

``sigma`` is the largest value in ``[sigma_min, sigma_max]`` whose anchor NLL stays within ``(1 + epsilon)`` of the
mean model's: bisection on ``log sigma`` until the bracket ``sigma_hi / sigma_lo <= 1 + tolerance``, keeping the
lower end. The NLL of the Bayesian model is the **expected** NLL (the paper's choice): the mean over ``samples``
fixed posterior draws (``posterior_sample`` with ``sample_seed(seed, k)``) of the anchor NLL of each draw. The draws
E are the same at every sigma (common random numbers), so NLL(sigma) is a deterministic, smooth function of sigma and
the bisection is reproducible. A non-finite NLL at some sigma counts as over the threshold.

The result is an ordinary BayesLoRA adapter (``bayesian_factor="A"``, its ``bayeslora_rho`` the exact inverse of
``std_param`` at ``sigma / d_i``): ``save_tfb`` writes it with ``save_pretrained`` plus ``tfb_config.json`` (the
search's outcome), ``PeftModel.from_pretrained`` loads it back as BayesLoRA and ``BayesLoraPosterior`` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from peft_bayes.data.loading import is_choice_data
from peft_bayes.errors import InputError
from peft_bayes.io import write_folder_atomically
from peft_bayes.options import add_option_flags, coerce_enums, flags_of, option, options_from_args, require
from peft_bayes.posterior.base import Progress, posterior_folder, require_adapter, sample_seed
from peft_bayes.posterior.bayeslora import BayesLoraPosterior
from peft_bayes.posterior.likelihood import IGNORE, ChoiceBatch, LMBatch, choice_nll, lm_nll
from peft_bayes.tuners.bayeslora import posterior_sample, sampling
from peft_bayes.tuners.bayeslora.config import BayesLoraConfig, StdParam
from peft_bayes.tuners.bayeslora.layer import layer_class_for, rho_from_std

TFB_CONFIG_NAME = "tfb_config.json"
ADAPTER = "default"  # the adapter name of the BayesLoRA model TFB builds
SINGULAR_FLOOR = 1e-4  # singular values below this fraction of their layer's largest are clamped (std only)
# init_lora_weights values that rewrite the base weights at initialisation: the unloaded base is not the original.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class TfbOptions:
    """Settings of TFB's sigma search.

    Args:
        epsilon: Relative threshold: the largest sigma with expected NLL <= (1 + epsilon) * NLL of the mean.
        samples: Posterior draws the expected NLL averages over (the same draws at every sigma).
        sigma_bounds: ``(sigma_min, sigma_max)`` of the search.
        tolerance: The search stops when ``sigma_hi / sigma_lo <= 1 + tolerance``.
        seed: Seed of the draws (draw k uses ``sample_seed(seed, k)``, as evaluation does; the scripts: ``--seed``).
        std_param: BayesLoRA's ``std_param`` of the result (``square``: rho = sqrt(std), or ``softplus``).
    """

    epsilon: float = option(
        0.01, "relative NLL threshold on the anchor set (--fit_data_path) of the sigma search", flag="tfb_epsilon"
    )
    samples: int = option(4, "posterior draws of the anchor NLL", flag="tfb_samples")
    sigma_bounds: tuple[float, float] = option((1e-6, 1.0), flag=False)
    tolerance: float = option(0.02, flag=False)
    seed: int = option(0, flag=False)
    std_param: StdParam = option(StdParam.SQUARE, flag=False)

    def __post_init__(self) -> None:
        coerce_enums(self)
        eps, samples, tol = self.epsilon, self.samples, self.tolerance
        require(isinstance(eps, (int, float)) and eps >= 0, f"`epsilon` must be a non-negative number, got {eps!r}")
        try:
            lo, hi = (float(v) for v in self.sigma_bounds)
        except (TypeError, ValueError):
            lo, hi = math.nan, math.nan
        require(
            0 < lo <= hi < math.inf,
            f"`sigma_bounds` must be 0 < lower <= upper < inf, got {tuple(self.sigma_bounds)!r}",
        )
        self.sigma_bounds = (lo, hi)
        require(isinstance(samples, int) and samples >= 1, f"`samples` must be a positive integer, got {samples!r}")
        require(isinstance(tol, (int, float)) and tol > 0, f"`tolerance` must be a positive number, got {tol!r}")


@dataclass(frozen=True)
class TfbResult:
    """Outcome of the sigma search; saved as ``tfb_config.json`` next to the adapter.

    Attributes:
        sigma: The shared std (``sigma_ij = sigma / d_i``).
        epsilon: The relative threshold: NLL(sigma) <= (1 + epsilon) * nll_mean.
        nll_mean: Anchor NLL of the original LoRA (the posterior mean), per unit.
        nll_at_sigma: Expected anchor NLL at ``sigma``, per unit.
        threshold: ``(1 + epsilon) * nll_mean``.
        sigma_upper: The smallest sigma tried that broke the threshold (``sigma <= sigma_upper <= sigma * (1 +
            tolerance)``), None when ``sigma`` is the upper bound.
        nll_upper: Expected anchor NLL at ``sigma_upper`` (None with it).
        sigma_bounds, tolerance, samples, seed: The search's settings.
        n_evals: Expected-NLL evaluations (each ``samples`` passes over the anchor set), the mean's not counted.
        n_anchor, unit: Size of the anchor set: labelled examples (``"example"``, ChoiceBatch) or scored tokens
            (``"token"``, LMBatch); NLLs are per unit.
        std_param: BayesLoRA's std parametrisation the rho were written for.
    """

    sigma: float
    epsilon: float
    nll_mean: float
    nll_at_sigma: float
    threshold: float
    sigma_upper: float | None
    nll_upper: float | None
    sigma_bounds: tuple[float, float]
    tolerance: float
    samples: int
    seed: int
    n_evals: int
    n_anchor: int
    unit: str
    std_param: str

    @property
    def at_upper_bound(self) -> bool:
        return self.sigma_upper is None

    def to_dict(self) -> dict:
        return {"method": "tfb", **dataclasses.asdict(self), "sigma_bounds": list(self.sigma_bounds)}

    @classmethod
    def from_dict(cls, data: dict) -> TfbResult:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["sigma_bounds"] = tuple(values.get("sigma_bounds", ()))
        return cls(**values)


# --- the rotation ------------------------------------------------------------------------------------------------
def rotate_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A', B', d)`` in float64 with ``B' A' = B A``: ``B' = U diag(d)``, ``A' = Vᵀ A`` from the SVD of B.

    Args:
        a: (r, in) LoRA A. b: (out, r) LoRA B.

    Returns:
        A' (r, in), B' (out, r) and d (r,) descending; when out < r the last r - out entries of d are 0 and the
        matching columns of B' are zero (V is completed to an orthonormal r x r basis).
    """
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    out, r = b64.shape
    u, s, vh = torch.linalg.svd(b64, full_matrices=out < r)  # vh: (r, r) either way
    k = s.shape[0]
    d = s.new_zeros(r)
    d[:k] = s
    b_rot = b64.new_zeros(out, r)
    b_rot[:, :k] = u[:, :k] * s
    return vh @ a64, b_rot, d


def inverse_scales(d: torch.Tensor) -> torch.Tensor:
    """(r,) ``1 / max(d_i, SINGULAR_FLOOR * max(d))``: ``sigma_ij = sigma * inverse_scales(d)[i]``."""
    return 1.0 / d.clamp_min(SINGULAR_FLOOR * float(d.max()))


# --- checks and conversion ---------------------------------------------------------------------------------------
def _lora_adapter(peft_model):
    """(adapter name, LoraConfig) of the one active adapter, or a one-line InputError where TFB does not apply."""
    from peft import PeftModel
    from peft.utils import PeftType

    if not isinstance(peft_model, PeftModel):
        raise InputError(f"TFB needs a PeftModel with a trained LoRA adapter, got {type(peft_model).__name__}")
    active = peft_model.active_adapters
    if len(active) != 1:
        raise InputError(f"TFB Bayesianizes one LoRA adapter; {len(active)} are active ({', '.join(active)})")
    name = active[0]
    config = peft_model.peft_config[name]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != PeftType.LORA.value:
        raise InputError(f"TFB turns a LoRA adapter into BayesLoRA; adapter {name!r} is {peft_type}, not LORA")
    if getattr(config, "use_dora", False):
        raise InputError(f"TFB does not apply to DoRA (adapter {name!r} has use_dora=True)")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise InputError(
            f"adapter {name!r} uses init_lora_weights={init!r}, which rewrites the base weights: save it converted "
            "to a plain LoRA (path_initial_model_for_weight_conversion) and Bayesianize that"
        )
    return name, config


def _lora_factors(peft_model, adapter: str) -> dict[str, tuple]:
    """{module name: (A', B', d, B's bias or None)} of every LoRA layer of ``adapter``; InputError for layers
    BayesLoRA lacks."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for module_name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter in getattr(layer, "lora_embedding_A", {}):
            raise InputError(f"TFB supports LoRA on Linear / Conv1D layers; {module_name} is an embedding LoRA")
        if adapter not in layer.lora_A:
            continue
        try:
            layer_class_for(layer.get_base_layer())
        except TypeError:
            base = type(layer.get_base_layer()).__name__
            raise InputError(f"TFB supports LoRA on Linear / Conv1D layers; {module_name} wraps {base}") from None
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if not bool(b.detach().any()):
            raise InputError(f"lora_B of {module_name} is all zeros: TFB needs a trained LoRA adapter")
        bias = layer.lora_B[adapter].bias  # lora_bias=True: B x + bias, untouched by the rotation
        factors[module_name] = (*rotate_factors(a, b), None if bias is None else bias.detach().clone())
    if not factors:
        raise InputError(f"adapter {adapter!r} has no LoRA layer to Bayesianize")
    return factors


def _bayes_config(lora_config, std_param: str):
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"}
    values = {n: getattr(lora_config, n) for n in names if hasattr(lora_config, n)}
    values.update(init_lora_weights=True, bayesian_factor="A", std_param=std_param)
    try:
        return BayesLoraConfig(**values)
    except ValueError as err:
        raise InputError(f"TFB cannot express this LoRA as BayesLoRA: {err}") from None


def set_sigma(model, scales: dict[str, torch.Tensor], sigma: float, std_param: str) -> None:
    """Writes ``rho = std_param^-1(sigma * scales[name][i])`` (computed in float64) into every layer of ``scales``."""

    modules = dict(model.named_modules())
    for module_name, inv in scales.items():
        rho = modules[module_name].bayeslora_rho[ADAPTER]
        std = (sigma * inv.to(torch.float64))[:, None].expand(rho.shape)
        with torch.no_grad():
            rho.copy_(rho_from_std(std, std_param).to(device=rho.device, dtype=rho.dtype))


def convert(peft_model, std_param: str = "square"):
    """The LoRA of ``peft_model`` as a BayesLoRA model with the rotated factors (rho not yet meaningful).

    ``peft_model``'s LoRA layers are removed (``unload``): its base model is reused, not copied, and the returned
    ``PeftModel`` (adapter ``"default"``) wraps it. Every check runs before anything is changed.

    Returns:
        (bayes model in eval mode, {module name: (r,) float64 inverse scales ``1 / max(d_i, floor)``}).
    """
    return _build(peft_model, *_checked(peft_model, std_param))


def _checked(peft_model, std_param: str) -> tuple[dict, object]:
    """(rotated factors, BayesLoraConfig): everything that can refuse the model, before anything changes."""
    adapter, lora_config = _lora_adapter(peft_model)
    return _lora_factors(peft_model, adapter), _bayes_config(lora_config, std_param)


def _build(peft_model, factors: dict, bayes_config) -> tuple:
    from peft import get_peft_model

    base = peft_model.unload()
    model = get_peft_model(base, bayes_config).eval()
    modules = dict(model.named_modules())
    missing = sorted(set(factors) - set(modules))
    if missing:  # cannot happen while PEFT names modules the same way for both tuners
        raise RuntimeError(f"BayesLoRA model lacks the LoRA layers {missing}")
    scales = {}
    with torch.no_grad():
        for module_name, (a_rot, b_rot, d, bias) in factors.items():
            layer = modules[module_name]
            pairs = [(layer.lora_A[ADAPTER].weight, a_rot), (layer.lora_B[ADAPTER].weight, b_rot)]
            if bias is not None:
                pairs.append((layer.lora_B[ADAPTER].bias, bias))
            for target, value in pairs:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
            scales[module_name] = inverse_scales(d)
    return model, scales


# --- the anchor NLL and the search -------------------------------------------------------------------------------
def _anchor_kind(batches: list) -> tuple[Callable, str, int]:
    """(nll function, unit, number of units) of the anchor batches; InputError when empty or mixed."""
    if not batches:
        raise InputError("TFB needs an anchor set (a slice of the training data); it is empty")
    if all(isinstance(b, ChoiceBatch) for b in batches):
        count = sum(int((b.labels >= 0).sum()) for b in batches)
        nll, unit = choice_nll, "example"
    elif all(isinstance(b, LMBatch) for b in batches):
        count = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
        nll, unit = lm_nll, "token"
    else:
        kinds = sorted({type(b).__name__ for b in batches})
        raise InputError(f"TFB anchor batches must all be ChoiceBatch or all LMBatch, got {', '.join(kinds)}")
    if count == 0:
        raise InputError(f"the TFB anchor set has no labelled {unit}: nothing to measure the NLL on")
    return nll, unit, count


@torch.no_grad()
def _pass_nll(model, batches: list, nll: Callable, tick: Callable[[], None]) -> float:
    total = 0.0
    for batch in batches:
        total += float(nll(model, batch))
        tick()
    return total


def expected_nll(model, batches: list, nll: Callable, count: int, samples: int, seed: int, tick) -> float:
    """Mean over ``samples`` fixed posterior draws of the anchor NLL per unit (the model's current rho)."""

    total = 0.0
    for index in range(samples):
        with posterior_sample(model, sample_seed(seed, index)):
            total += _pass_nll(model, batches, nll, tick)
    return total / (samples * count)


def bisection_steps(bounds: tuple[float, float], tolerance: float) -> int:
    """Halvings of ``log(hi / lo)`` until the bracket ratio is at most ``1 + tolerance``."""
    lo, hi = bounds
    ratio = math.log(hi / lo) / math.log1p(tolerance)
    return max(0, math.ceil(math.log2(ratio))) if ratio > 1 else 0


def search_sigma(
    nll_at: Callable[[float], float], threshold: float, bounds: tuple[float, float], tolerance: float
) -> tuple[float, float, float | None, float | None, int]:
    """The largest sigma in ``bounds`` found with ``nll_at(sigma) <= threshold``, by bisection on ``log sigma``.

    Returns:
        (sigma, its NLL, the smallest failing sigma tried or None, its NLL or None, evaluations). ``sigma`` is the
        upper bound when that passes; InputError when even the lower bound fails. NaN counts as failing.
    """
    lo, hi = bounds
    nll_hi = nll_at(hi)
    if nll_hi <= threshold:
        return hi, nll_hi, None, None, 1
    nll_lo = nll_at(lo) if lo < hi else nll_hi
    if not nll_lo <= threshold:
        raise InputError(
            f"sigma_bounds: even sigma={lo:g} gives anchor NLL {nll_lo:.6g} > threshold {threshold:.6g}; "
            "lower the lower bound or raise epsilon"
        )
    steps = bisection_steps(bounds, tolerance)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        value = nll_at(mid)
        if value <= threshold:
            lo, nll_lo = mid, value
        else:
            hi, nll_hi = mid, value
    return lo, nll_lo, hi, nll_hi, 2 + steps


class _Counter:
    """``tick()`` per pass over one anchor batch, reported to ``progress(done, total)``; ``finish()`` reports the
    total when the search stopped early."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None and self.done < self.total:
            self.progress(self.total, self.total)


def bayesianize(
    peft_model,
    anchor_batches: Iterable[ChoiceBatch | LMBatch],
    options: TfbOptions | None = None,
    *,
    progress: Progress | None = None,
    **settings,
):
    """Turns the trained LoRA adapter of ``peft_model`` into a BayesLoRA adapter with TFB's sigma.

    Args:
        peft_model: A ``PeftModel`` with one active plain LoRA adapter (Linear / Conv1D targets, no DoRA). Its LoRA
            layers are removed: use the returned model (it wraps the same base model, nothing is copied).
        anchor_batches: The anchor set, a slice of the training data, all ``ChoiceBatch`` (NLL per labelled example)
            or all ``LMBatch`` (NLL per scored token); held in memory and passed over ``samples`` times per sigma.
        options: [`TfbOptions`]; or its fields as keywords (``epsilon=0.01, samples=4, ...``).
        progress: ``progress(done, total)`` in passes over one anchor batch; ``total`` assumes the full search.

    Returns:
        (the BayesLoRA ``PeftModel``, eval mode, adapter ``"default"``, with rho at the found sigma; [`TfbResult`]).

    Raises:
        InputError: Bad options, not a LoRA adapter (bottleneck, prefix, DoRA, ...), an untrained one (B = 0), an
            empty or mixed anchor set, a non-finite NLL of the mean: all before any change to ``peft_model``. A lower
            sigma bound that already breaks the threshold is found after the conversion (``peft_model`` is then
            consumed).
    """
    o = options if options is not None else TfbOptions(**settings)
    batches = list(anchor_batches)
    nll, unit, count = _anchor_kind(batches)
    plan = _checked(peft_model, o.std_param)  # before any forward pass: a one-line error for what is not a LoRA
    tick = _Counter(progress, len(batches) * (1 + o.samples * (2 + bisection_steps(o.sigma_bounds, o.tolerance))))
    peft_model.eval()
    nll_mean = _pass_nll(peft_model, batches, nll, tick) / count  # the original LoRA: the input is still intact
    if not math.isfinite(nll_mean):
        raise InputError(f"the anchor NLL of the LoRA adapter is {nll_mean} (not finite): check the anchor data")
    threshold = math.inf if math.isinf(o.epsilon) else (1.0 + o.epsilon) * nll_mean
    model, scales = _build(peft_model, *plan)

    def nll_at(sigma: float) -> float:
        set_sigma(model, scales, sigma, o.std_param)
        return expected_nll(model, batches, nll, count, o.samples, o.seed, tick)

    with sampling(model, False):  # outside posterior_sample: the mean
        sigma, nll_sigma, upper, nll_upper, n_evals = search_sigma(nll_at, threshold, o.sigma_bounds, o.tolerance)
    set_sigma(model, scales, sigma, o.std_param)
    tick.finish()
    found = {"sigma": sigma, "nll_mean": nll_mean, "nll_at_sigma": nll_sigma, "threshold": threshold}
    found |= {"sigma_upper": upper, "nll_upper": nll_upper, "n_evals": n_evals, "n_anchor": count, "unit": unit}
    settings = {"epsilon": float(o.epsilon), "tolerance": float(o.tolerance), "std_param": str(o.std_param)}
    settings |= {"sigma_bounds": o.sigma_bounds, "samples": o.samples, "seed": o.seed}
    return model, TfbResult(**found, **settings)


# --- persistence -------------------------------------------------------------------------------------------------
def save_tfb(bayes_model, result: TfbResult, folder: str) -> str:
    """Writes the BayesLoRA adapter (``save_pretrained``) and ``tfb_config.json`` to ``folder``.

    Written to a temporary folder beside it, then renamed into place, so a failed save leaves an earlier one intact.
    ``PeftModel.from_pretrained(base, folder)`` loads it back as BayesLoRA. Returns ``folder``.
    """

    def write(tmp: str) -> None:
        bayes_model.save_pretrained(tmp)
        with open(os.path.join(tmp, TFB_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)

    return write_folder_atomically(os.path.abspath(folder), write, ".tfb-")


def load_tfb_result(folder: str) -> TfbResult:
    """The [`TfbResult`] saved beside a TFB adapter; a one-line InputError when there is none."""
    path = os.path.join(folder, TFB_CONFIG_NAME)
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no {TFB_CONFIG_NAME} there (not a TFB adapter folder)")
    try:
        with open(path, encoding="utf-8") as f:
            return TfbResult.from_dict(json.load(f))
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: not a valid TFB result ({err})") from None


class Tfb(BayesLoraPosterior):
    """``--posterior tfb``: the BayesLoRA posterior TFB makes of a trained LoRA adapter (``bayesianize`` on the anchor
    set ``--fit_data_path``, saved next to the adapter, reused later). It evaluates as the BayesLoRA posterior it is,
    and its summary says so (``posterior: bayeslora``)."""

    name: ClassVar[str] = "tfb"
    accepts: ClassVar[tuple[str, ...]] = ("fit_data_path", "fit_limit", *flags_of(TfbOptions))

    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        if training:
            return
        g = parser.add_argument_group("training-free Bayesianization (evaluate.py --posterior tfb)")
        add_option_flags(g, TfbOptions)

    @classmethod
    def check_args(cls, args) -> None:
        if args.tfb_epsilon is not None and not args.tfb_epsilon > 0:
            raise InputError(f"--tfb_epsilon must be a positive relative threshold, got {args.tfb_epsilon}")
        options_from_args(TfbOptions, args)
        if not args.fit_data_path and not args.adapter:
            raise InputError("--posterior tfb needs --adapter (a trained LoRA adapter)")

    @classmethod
    def may_sample(cls, args) -> bool:
        return True

    @classmethod
    def from_args(cls, work) -> Tfb:
        """Bayesianizes the LoRA of ``work.model`` on ``--fit_data_path`` and saves it, or loads the saved one; the
        posterior is over a new ``PeftModel`` on the same base model."""
        from peft import PeftModel

        args = work.args
        folder = posterior_folder(require_adapter(args, cls.name), cls.name)
        if args.fit_data_path:
            likelihood = "choice" if is_choice_data(args.fit_data_path) else "lm"
            batches = list(work.batches(args.fit_data_path, args.fit_limit, likelihood, 4))
            options = options_from_args(TfbOptions, args, seed=args.seed)
            bayes_model, result = bayesianize(work.model, batches, options, progress=work.progress("TFB sigma search"))
            save_tfb(bayes_model, result, folder)
            if not work.quiet:
                print(
                    f"TFB: sigma {result.sigma:.4g} (anchor NLL {result.nll_mean:.4f} -> {result.nll_at_sigma:.4f}, "
                    f"threshold {result.threshold:.4f}, {result.n_evals} evaluations); BayesLoRA adapter saved to "
                    f"{folder}"
                )
            return cls(bayes_model)
        if not os.path.isdir(folder):
            raise InputError(f"no saved TFB adapter in {folder}: give --fit_data_path (an anchor set) to make one")
        load_tfb_result(folder)  # a one-line error when the folder is not a TFB adapter
        return cls(PeftModel.from_pretrained(work.model.unload(), folder).eval())

    def summary(self) -> dict:
        return {"posterior": BayesLoraPosterior.name, "bayes_eval_draw": self.eval_draw}
