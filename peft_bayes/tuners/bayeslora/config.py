"""Configuration of Bayesian LoRA (BLoB: Wang et al., "BLoB: Bayesian Low-Rank Adaptation by Backpropagation for
Large Language Models", NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peft import LoraConfig

from peft_bayes.options import OptionEnum, coerce_enums, option, require
from peft_bayes.registry import peft_type_of


class StdParam(OptionEnum):
    """sigma = rho^2 (``square``, BLoB's) or softplus(rho)."""

    SQUARE = "square"
    SOFTPLUS = "softplus"


class KlSchedule(OptionEnum):
    BLOB = "blob"
    CONSTANT = "constant"
    LINEAR = "linear"


class BayesianFactor(OptionEnum):
    A = "A"
    B = "B"


STD_PARAMS, KL_SCHEDULES, BAYESIAN_FACTORS = StdParam.values(), KlSchedule.values(), BayesianFactor.values()
# LoraConfig options that replace LoRA's forward with another variant's: they cannot be combined with ours.
_EXCLUSIVE_VARIANTS = (
    "use_dora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_bdlora",
    "mica",
)


@dataclass
class BayesLoraConfig(LoraConfig):
    """LoRA with a diagonal Gaussian posterior over one factor, learned by backprop (BLoB).

    The Bayesian factor (A by default, as in BLoB) is ``M + sigma * E``: its mean M is LoRA's ``lora_A`` weight,
    its standard deviation ``sigma = rho^2`` (or ``softplus(rho)``) is a new parameter ``bayeslora_rho``. The other
    factor stays deterministic. Training adds ``kl_weight * schedule(step) * KL(q || p) / N`` to the loss, with the
    prior ``p = N(0, prior_std^2)`` on every entry and N the number of training examples. Every [`~peft.LoraConfig`]
    field applies (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ...) except the LoRA variants that
    replace its forward (DoRA, aLoRA, ...).

    Args:
        prior_std: Standard deviation of the zero-mean Gaussian prior (BLoB's ``bayes_beta``: 0.2).
        init_std: BLoB's epsilon: ``sigma`` starts at ``u^2`` with ``u ~ U(eps / sqrt(2), eps)``, for both
            parametrisations (for ``softplus``, rho starts at ``softplus^-1(u^2)``).
        std_param: ``"square"`` (``sigma = rho^2``, BLoB's default) or ``"softplus"``.
        flipout: Decorrelate the noise across tokens with flipout (one E per forward, random signs per token).
        kl_schedule: ``"blob"`` (the weight of minibatch i of the M in an epoch is ``2^i / (2^M - 1)``, rescaled by
            M so that an epoch's weights average 1), ``"constant"``, or ``"linear"`` (from 0 to 1 over
            ``kl_anneal_steps`` optimizer steps, then 1).
        kl_weight: Factor on the KL term.
        kl_anneal_steps: Length of the linear warm-up; None = the whole run.
        bayesian_factor: ``"A"`` (BLoB) or ``"B"``.

    Example:
        ```python
        >>> import peft_bayes
        >>> from peft import get_peft_model
        >>> config = peft_bayes.BayesLoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(base_model, config)
        >>> model.kl_divergence()  # summed over every Bayesian factor
        ```
    """

    prior_std: float = option(0.2, "std of the N(0, prior_std^2) prior (BLoB: 0.2)")
    init_std: float = option(0.05, "BLoB's eps: sigma starts at u^2, u ~ U(eps/sqrt(2), eps)", flag="bayes_eps")
    std_param: StdParam = option(StdParam.SQUARE, "sigma = rho^2 or softplus(rho)", flag="bayes_std_param")
    flipout: bool = option(True, "per-token flipout signs (one noise draw per forward)")
    kl_schedule: KlSchedule = option(KlSchedule.BLOB, "KL weighting per step")
    kl_weight: float = option(1.0, "KL factor (blob: on its step pi_t * KL; single: on KL / N_train in the loss)")
    kl_anneal_steps: int | None = option(None, "linear schedule: warm-up steps (default: all)")
    bayesian_factor: BayesianFactor = option(BayesianFactor.A, "the LoRA factor with a posterior")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_of("bayeslora")
        for name in _EXCLUSIVE_VARIANTS:
            if getattr(self, name, None):
                raise ValueError(f"BayesLoraConfig cannot be combined with {name}: it replaces the same forward")
        coerce_enums(self)
        for name in ("prior_std", "init_std"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and value > 0, f"`{name}` must be a positive number, got {value!r}"
            )
        w, steps = self.kl_weight, self.kl_anneal_steps
        require(isinstance(w, (int, float)) and w >= 0, f"`kl_weight` must be a non-negative number, got {w!r}")
        require(steps is None or steps > 0, f"`kl_anneal_steps` must be positive or None, got {steps!r}")


def kl_schedule_factor(
    schedule: str, step: int, steps_per_epoch: int, total_steps: int, anneal_steps: int | None = None
) -> float:
    """The factor on ``KL / N`` at optimizer step ``step`` (0-based); it averages 1 over an epoch for ``blob``.

    - ``constant``: 1.
    - ``linear``: ``min(1, (step + 1) / anneal_steps)``, ``anneal_steps`` defaulting to ``total_steps``.
    - ``blob``: minibatch i = step mod M of the M = ``steps_per_epoch`` in an epoch gets ``2^i / (2^M - 1)`` of the
      epoch's KL (Blundell et al. 2015's weights, as BLoB uses them: they sum to 1 over the epoch). Counted per
      example this is ``M * 2^i / (2^M - 1)`` times ``KL / N``, which averages 1 over the epoch. Computed as
      ``M * 2^(i - M) / (1 - 2^-M)`` so that large M does not overflow.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        length = anneal_steps or max(total_steps, 1)
        return min(1.0, (step + 1) / length)
    if schedule == "blob":
        m = max(steps_per_epoch, 1)
        i = step % m
        return m * 2.0 ** (i - m) / (1.0 - 2.0**-m)
    raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")


def blob_kl_weight(step: int, cycle: int) -> float:
    """BLoB's weight pi on the KL at optimizer step ``step`` (1-based, a global counter): ``pi = 2^i / (2^(M+1) - 1)``
    with ``i = ((step - 1) mod M) + 1`` cycling 1..M over the whole run, M = ``cycle``.

    Computed as ``2^(i - M - 1) / (1 - 2^-(M+1))`` so that large M does not overflow. Within a cycle the weights sum
    to ``(2^(M+1) - 2) / (2^(M+1) - 1)``, just under 1.
    """
    if step < 1 or cycle < 1:
        raise ValueError(f"blob_kl_weight: step and cycle must be >= 1, got {step}, {cycle}")
    i = (step - 1) % cycle + 1
    return 2.0 ** (i - cycle - 1) / (1.0 - 2.0 ** -(cycle + 1))


def blob_cycle_length(
    n_train: int, batch_size: int, steps_per_epoch: int, gamma: float = 8.0, rescaling: bool = True
) -> int:
    """M, the length in optimizer steps of BLoB's KL cycle.

    With BLoB's data-set rescaling (``--bayes_datasetrescaling``, on in all of its scripts),
    ``M = int(100 * N^(pi / gamma) / batch_size)``, ``batch_size`` being the examples per optimizer step over all
    processes (BLoB: processes x per-device batch); without it, the steps of one epoch. At least 1.
    """
    if not rescaling:
        return max(int(steps_per_epoch), 1)
    if gamma <= 0:
        raise ValueError(f"bayes_gamma must be positive, got {gamma}")
    return max(int(100 * n_train ** (math.pi / gamma) / batch_size), 1)
