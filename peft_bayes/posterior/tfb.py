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
mean model's, found by ``TfbOptions.search`` (``peft_bayes.posterior.tfb_search``): by default an interpolation
search on ``log sigma`` (bisection kept selectable) until the bracket ``sigma_hi / sigma_lo <= 1 + tolerance``,
keeping the lower end, or the authors' interval halving. The NLL of the Bayesian model is by default the **expected**
NLL (the paper's choice): the mean over ``samples`` fixed posterior draws (``posterior_sample`` with
``sample_seed(seed, k)``) of the anchor NLL of each draw; ``nll="predictive"`` is the NLL of their mean probabilities
(the authors' code). The draws E are the same at every sigma (common random numbers), so NLL(sigma) is a
deterministic, smooth function of sigma and the search is reproducible. A non-finite NLL at some sigma counts as over
the threshold.

The result is an ordinary BayesLoRA adapter (``bayesian_factor="A"``, its ``bayeslora_rho`` the exact inverse of
``std_param`` at ``sigma / d_i``): ``save_tfb`` writes it with ``save_pretrained`` plus ``tfb_config.json`` (the
search's outcome), ``PeftModel.from_pretrained`` loads it back as BayesLoRA and ``BayesLoraPosterior`` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from peft_bayes.data.loading import is_choice_data
from peft_bayes.errors import InputError
from peft_bayes.io import write_folder_atomically
from peft_bayes.options import (
    OptionEnum,
    OptionError,
    add_option_flags,
    coerce_enums,
    flags_of,
    option,
    option_values,
    require,
    with_flag_names,
)
from peft_bayes.posterior.base import Progress, posterior_folder, require_adapter
from peft_bayes.posterior.bayeslora import BayesLoraPosterior
from peft_bayes.posterior.tfb_search import (  # noqa: F401  (search_sigma, bisection_steps: public here too)
    Anchors,
    anchor_nll,
    bisection_steps,
    halving_search,
    interpolation_search,
    search_evaluations,
    search_sigma,
)
from peft_bayes.tuners.bayeslora import sampling
from peft_bayes.tuners.bayeslora.config import BayesLoraConfig, StdParam
from peft_bayes.tuners.bayeslora.layer import layer_class_for, rho_from_std

TFB_CONFIG_NAME = "tfb_config.json"
ADAPTER = "default"  # the adapter name of the BayesLoRA model TFB builds
SINGULAR_FLOOR = 1e-4  # singular values below this fraction of their layer's largest are clamped (std only)
# init_lora_weights values that rewrite the base weights at initialisation: the unloaded base is not the original.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


class TfbNll(OptionEnum):
    EXPECTED = "expected"
    PREDICTIVE = "predictive"


class TfbLabels(OptionEnum):
    GOLD = "gold"
    PSEUDO = "pseudo"


class TfbSearch(OptionEnum):
    INTERPOLATION = "interpolation"
    BISECTION = "bisection"
    HALVING = "halving"


@dataclass
class TfbOptions:
    """Settings of TFB's sigma search (``peft_bayes.posterior.tfb_search`` describes each choice).

    Args:
        epsilon: Relative threshold on the anchor NLL: sigma passes while ``(NLL(sigma) - NLL_mean) / NLL_mean``
            (divided by the number of anchor units with ``per_anchor``) is at most ``epsilon`` (in absolute value
            for ``halving``, as BLoB's code).
        samples: Posterior draws of the anchor NLL (the same draws at every sigma).
        nll: ``expected`` (the mean of the draws' NLLs) or ``predictive`` (the NLL of their mean probability).
        labels: ``gold`` or ``pseudo`` (the mean model's own answers; multiple-choice anchors).
        search: ``interpolation``, ``bisection`` (both: the largest passing sigma to a ``1 + tolerance`` bracket)
            or ``halving`` (BLoB's: ``halvings`` linear halvings, the last violator).
        halvings: Steps of the ``halving`` search.
        per_anchor: Divide the relative change by the number of anchor units (BLoB's code).
        sigma_bounds: ``(sigma_min, sigma_max)`` of the search.
        tolerance: The bracket ratio where ``interpolation`` and ``bisection`` stop.
        seed: Seed of the draws (draw k uses ``sample_seed(seed, k)``, as evaluation does; the scripts: ``--seed``).
        std_param: BayesLoRA's ``std_param`` of the result (``square``: rho = sqrt(std), or ``softplus``).

    BLoB's code is ``TfbOptions(nll="predictive", labels="pseudo", search="halving", halvings=5, per_anchor=True,
    epsilon=0.003, sigma_bounds=(0.001, 0.015), samples=1)`` (BayesAdapt's: gold labels, ``per_anchor`` False,
    bounds (0.001, 0.2)).
    """

    epsilon: float = option(
        0.01, "relative NLL threshold on the anchor set (--fit_data_path) of the sigma search", flag="tfb_epsilon"
    )
    samples: int = option(4, "posterior draws of the anchor NLL", flag="tfb_samples")
    nll: TfbNll = option(TfbNll.EXPECTED, "anchor NLL: the draws' mean NLL, or the NLL of their mean", flag="tfb_nll")
    labels: TfbLabels = option(TfbLabels.GOLD, "anchor labels: gold, or the mean model's answers", flag="tfb_labels")
    search: TfbSearch = option(
        TfbSearch.INTERPOLATION,
        "interpolation / bisection: the largest passing sigma to --tfb_tolerance; halving: BLoB's",
        flag="tfb_search",
    )
    halvings: int = option(5, "steps of the halving search", flag="tfb_halvings")
    per_anchor: bool = option(
        False, "divide the relative NLL change by the anchor units (BLoB)", flag="tfb_per_anchor"
    )
    sigma_bounds: tuple[float, float] = option(
        (1e-6, 1.0), "lower,upper sigma of the search", flag="tfb_sigma_bounds", hand_written=True
    )
    tolerance: float = option(0.02, "bracket ratio where interpolation and bisection stop", flag="tfb_tolerance")
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
        require(self.halvings >= 1, f"`halvings` must be a positive number of steps, got {self.halvings}")

    def allowed_change(self, n_units: int) -> float:
        """The largest relative NLL change that passes."""
        return self.epsilon * (n_units if self.per_anchor else 1)


def parse_sigma_bounds(text: str) -> tuple[float, float]:
    """``--tfb_sigma_bounds 0.001,0.015`` -> (0.001, 0.015)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"`sigma_bounds` must be two numbers lower,upper, got {text!r}") from None
    return lo, hi


@dataclass(frozen=True)
class TfbResult:
    """Outcome of the sigma search; saved as ``tfb_config.json`` next to the adapter.

    Attributes:
        sigma: The shared std (``sigma_ij = sigma / d_i``).
        epsilon: The relative threshold (see [`TfbOptions`]).
        nll_mean: Anchor NLL of the original LoRA (the posterior mean), per unit, on the search's labels.
        nll_at_sigma: Anchor NLL (``nll``) at ``sigma``, per unit (NaN where the halving search never tried it).
        threshold: ``nll_mean * (1 + allowed change)``.
        sigma_upper: The smallest sigma tried that broke the threshold (``sigma <= sigma_upper <= sigma * (1 +
            tolerance)`` for interpolation and bisection; ``sigma`` itself for halving), None when ``sigma`` is the
            upper bound.
        nll_upper: Anchor NLL at ``sigma_upper`` (None with it).
        sigma_bounds, tolerance, samples, seed: The search's settings.
        n_evals: NLL evaluations (each ``samples`` passes over the anchor set), the mean's not counted.
        n_anchor, unit: Size of the anchor set: labelled examples (``"example"``) or scored tokens (``"token"``);
            NLLs are per unit.
        std_param: BayesLoRA's std parametrisation the rho were written for.
        nll, labels, search, halvings, per_anchor: The criterion's settings.
        search_seconds: Wall time of the search, the mean's pass and the conversion included.
        trace: ``[sigma, NLL]`` of every evaluation, in order (the search's diagnostic).
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
    nll: str = "expected"
    labels: str = "gold"
    search: str = "bisection"
    halvings: int = 5
    per_anchor: bool = False
    search_seconds: float | None = None
    trace: list | None = None

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


def bayesianize(
    peft_model,
    anchors,
    options: TfbOptions | None = None,
    *,
    progress: Progress | None = None,
    **settings,
):
    """Turns the trained LoRA adapter of ``peft_model`` into a BayesLoRA adapter with TFB's sigma.

    Args:
        peft_model: A ``PeftModel`` with one active plain LoRA adapter (Linear / Conv1D targets, no DoRA). Its LoRA
            layers are removed: use the returned model (it wraps the same base model, nothing is copied).
        anchors: The anchor set, a slice of the training data: an ``OptionScorer`` of ``peft_model`` with gold labels
            (multiple choice, scored on evaluation's fast path), or a list of all ``ChoiceBatch`` (NLL per labelled
            example) or all ``LMBatch`` (NLL per scored token), passed over ``samples`` times per sigma.
        options: [`TfbOptions`]; or its fields as keywords (``epsilon=0.01, samples=4, ...``).
        progress: ``progress(done, total)`` in passes over the anchor set; ``total`` assumes the longest search.

    Returns:
        (the BayesLoRA ``PeftModel``, eval mode, adapter ``"default"``, with rho at the found sigma; [`TfbResult`]).

    Raises:
        InputError: Bad options, not a LoRA adapter, an untrained one (B = 0), an empty or mixed anchor set, a
            non-finite NLL of the mean: all before any change to ``peft_model``. A lower sigma bound that already
            breaks the threshold is found after the conversion (``peft_model`` is then consumed).
    """
    t0 = time.perf_counter()
    o = options if options is not None else TfbOptions(**settings)
    data = Anchors(anchors, progress)
    plan = _checked(peft_model, o.std_param)  # before any forward pass: a one-line error for what is not a LoRA
    pseudo = o.labels == "pseudo"
    if pseudo and not data.choice:
        raise InputError("TFB pseudo-labels need multiple-choice anchors (the model's own answers)")
    data.total = 1 + int(pseudo) + o.samples * search_evaluations(o.search, o.sigma_bounds, o.tolerance, o.halvings)
    peft_model.eval()
    labels = data.predictions(peft_model) if pseudo else None
    nll_mean = float(-data.logps(peft_model, labels).sum() / data.count)  # the original LoRA: still intact
    if not math.isfinite(nll_mean):
        raise InputError(f"the anchor NLL of the LoRA adapter is {nll_mean} (not finite): check the anchor data")
    allowed = o.allowed_change(data.count)
    threshold = math.inf if math.isinf(allowed) else nll_mean + allowed * abs(nll_mean)
    model, scales = _build(peft_model, *plan)

    trace = []  # (sigma, NLL) of every evaluation, in order

    def nll_at(sigma: float) -> float:
        set_sigma(model, scales, sigma, o.std_param)
        trace.append([sigma, anchor_nll(model, data, labels, o.samples, o.seed, o.nll == "predictive")])
        return trace[-1][1]

    with sampling(model, False):  # outside posterior_sample: the mean
        found = _search(o, nll_at, threshold, nll_mean, allowed)
    sigma, nll_sigma, upper, nll_upper, n_evals = found
    set_sigma(model, scales, sigma, o.std_param)
    data.finish()
    result = {"sigma": sigma, "nll_mean": nll_mean, "nll_at_sigma": nll_sigma, "threshold": threshold}
    result |= {"sigma_upper": upper, "nll_upper": nll_upper, "n_evals": n_evals, "n_anchor": data.count}
    seconds = round(time.perf_counter() - t0, 3)
    return model, TfbResult(**result, **_settings(o, data.unit), search_seconds=seconds, trace=trace)


def _settings(o: TfbOptions, unit: str) -> dict:
    """The options a `TfbResult` records (plain JSON values)."""
    settings = {k: getattr(o, k) for k in ("sigma_bounds", "samples", "seed", "halvings", "per_anchor")}
    settings |= {k: str(getattr(o, k)) for k in ("std_param", "nll", "labels", "search")}
    return settings | {"epsilon": float(o.epsilon), "tolerance": float(o.tolerance), "unit": unit}


def _search(o: TfbOptions, nll_at: Callable[[float], float], threshold: float, nll_mean: float, allowed: float):
    if o.search == "halving":
        violates = lambda v: abs(v - nll_mean) > allowed * abs(nll_mean)  # noqa: E731
        return halving_search(violates, nll_at, o.sigma_bounds, o.halvings)
    if o.search == "bisection":
        return search_sigma(nll_at, threshold, o.sigma_bounds, o.tolerance)
    return interpolation_search(nll_at, threshold, o.sigma_bounds, o.tolerance, nll_mean)


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
        g.add_argument("--tfb_sigma_bounds", default=None, help="lower,upper sigma of the search (default: 1e-06,1.0)")

    @staticmethod
    def options_from_args(args) -> TfbOptions:
        """TfbOptions from evaluate.py's flags (the search's seed is --seed)."""

        def build() -> TfbOptions:
            values = option_values(TfbOptions, args)
            if args.tfb_sigma_bounds is not None:
                values["sigma_bounds"] = parse_sigma_bounds(args.tfb_sigma_bounds)
            return TfbOptions(**values, seed=args.seed)

        return with_flag_names(TfbOptions, build)

    @classmethod
    def check_args(cls, args) -> None:
        if args.tfb_epsilon is not None and not args.tfb_epsilon > 0:
            raise InputError(f"--tfb_epsilon must be a positive relative threshold, got {args.tfb_epsilon}")
        cls.options_from_args(args)
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
            return cls(cls.fit_and_save(work, args.fit_data_path, folder))
        if not os.path.isdir(folder):
            raise InputError(f"no saved TFB adapter in {folder}: give --fit_data_path (an anchor set) to make one")
        load_tfb_result(folder)  # a one-line error when the folder is not a TFB adapter
        return cls(PeftModel.from_pretrained(work.model.unload(), folder).eval())

    @classmethod
    def fit_and_save(cls, work, path: str, folder: str):
        """The BayesLoRA model TFB makes on the anchor set ``path``: multiple-choice anchors scored as the test set
        is (the evaluation's fast path, ``--batch_size``), response tokens as differentiable batches."""
        args = work.args
        if work.choice_data and is_choice_data(path):
            anchors = work.scorer(path, args.fit_limit)
        else:
            anchors = list(work.batches(path, args.fit_limit, "choice" if is_choice_data(path) else "lm", 4))
        options = cls.options_from_args(args)
        bayes_model, result = bayesianize(work.model, anchors, options, progress=work.progress("TFB sigma search"))
        save_tfb(bayes_model, result, folder)
        if not work.quiet:
            print(
                f"TFB: sigma {result.sigma:.4g} (anchor NLL {result.nll_mean:.4f} -> {result.nll_at_sigma:.4f}, "
                f"threshold {result.threshold:.4f}, {result.n_evals} evaluations, {result.search_seconds:.0f} s); "
                f"BayesLoRA adapter saved to {folder}"
            )
        return bayes_model

    def summary(self) -> dict:
        return {"posterior": BayesLoraPosterior.name, "bayes_eval_draw": self.eval_draw}
