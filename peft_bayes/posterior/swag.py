"""SWAG (Maddox et al. 2019) over the trainable adapter weights, collected during training (as swag-lora does).

From a start point (an epoch or a step) the learning rate is held at, or annealed to, a SWAG learning rate, and every
``collect_every`` optimizer steps (or once an epoch) the trainable tensors θ_i (P numbers, flattened) are collected:

- the running first moment θ̄ = mean_i θ_i and uncentered second moment mean_i θ_i², giving the diagonal variance
  σ² = max(mean θ² − θ̄², 0);
- the deviations θ_i − θ̄_i (θ̄_i: the running mean including θ_i) of the last K collected models, the columns of
  D (P, K).

The posterior is N(θ̄, Σ) with Σ = ½ (diag σ² + D Dᵀ / (K − 1)); a sample is

    θ = θ̄ + s (σ ⊙ z₁ / √2 + D z₂ / √(2 (K − 1))),   z₁ ~ N(0, I_P), z₂ ~ N(0, I_K)

with ``sample_scale`` s multiplying the standard deviation (covariance s² Σ). Diagonal only (``cov_mat`` False, or
fewer than two deviations): θ = θ̄ + s σ ⊙ z₁. swa_gaussian's ``scale`` multiplies the covariance *without* the ½, so
its usual ``scale=0.5`` with the low-rank part is ``sample_scale=1`` here. SWA is the mean θ̄ (``mean()``,
``export_swa``).

It needs only the trainable tensors, so it works for every adapter type. Under ``torchrun`` every rank sees the same
synchronised weights and collects the same moments; only rank 0 writes them (``SwagCollector.save``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from transformers import TrainerCallback

from peft_bayes.arguments import str2bool
from peft_bayes.errors import InputError
from peft_bayes.io import write_files_into
from peft_bayes.options import (
    OptionEnum,
    OptionError,
    add_option_flags,
    coerce_enums,
    flag_name,
    flags_of,
    option,
    option_values,
    options_from_args,
    require,
    with_flag_names,
)
from peft_bayes.posterior.base import (
    Posterior,
    posterior_folder,
    read_saved,
    require_adapter,
    swapped_weights,
    weights_fingerprint,
)
from peft_bayes.posterior.distributed import barrier, is_main_process


class AnnealStrategy(OptionEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class ScaleConvention(OptionEnum):
    """What ``sample_scale`` means: ``std`` = s above (this library's), ``swag_lora`` = swag-lora's ``scale``."""

    STD = "std"
    SWAG_LORA = "swag_lora"


def std_scale(sample_scale: float, convention: str = "std") -> float:
    """s of this library's sample from a scale in ``convention``. swag-lora draws θ̄ + √scale (σ ⊙ z₁ + D z₂ / √(K −
    1)), which is s = √(2 scale): its default scale 1.0 is s = √2, and s = 1 is its scale 0.5."""
    return math.sqrt(2.0 * sample_scale) if convention == "swag_lora" else float(sample_scale)


ADAPTER = "{adapter}"  # stands for the adapter's name in the saved parameter names


@dataclass
class SwagOptions:
    """Settings of SWAG collection and sampling (``stage="train"``: train.py's; the sample scale: both scripts').

    Args:
        start_epoch: Collection starts after this many epochs (a float: 1.5 = half way through epoch 2).
        start_step: Or after this many optimizer steps. Neither: half way through training. Not both.
        learning_rate: The SWAG learning rate from the start on; None keeps the Trainer's schedule.
        anneal_epochs: Epochs (float) over which the learning rate goes from the schedule's value to
            ``learning_rate`` (0: at once).
        anneal_strategy: ``constant`` (jump to ``learning_rate``), ``linear`` or ``cosine`` annealing.
        collect_every: Collect every this many optimizer steps after the start; 0 or None: at each epoch's end.
        max_num_models: K, the number of deviation columns kept (the rank of the low-rank part).
        cov_mat: Keep the deviations (low-rank + diagonal covariance); False: diagonal only (no D in memory).
        sample_scale: s, the factor on the standard deviation of a sample (0: the SWA mean), in
            ``scale_convention``.
        scale_convention: ``std`` (s as above) or ``swag_lora`` (``sample_scale`` is swag-lora's ``scale``, which
            multiplies the covariance without the ½: s = √(2 scale)).
    """

    start_epoch: float | None = option(None, flag="swag_start", stage="train", hand_written=True)
    start_step: int | None = option(None, flag="swag_start", stage="train", hand_written=True)
    learning_rate: float | None = option(
        None, "learning rate from the start on (default: keep the schedule)", flag="swag_learning_rate", stage="train"
    )
    anneal_epochs: float = option(0.0, "epochs to anneal to it", flag="swag_anneal_epochs", stage="train")
    anneal_strategy: AnnealStrategy = option(
        AnnealStrategy.CONSTANT, "how the learning rate reaches it", flag="swag_anneal_strategy", stage="train"
    )
    collect_every: int | None = option(
        None, "collect every N optimizer steps (default: once an epoch)", flag="swag_collect_every", stage="train"
    )
    max_num_models: int = option(20, "deviation columns K", flag="swag_max_num_models", stage="train")
    cov_mat: bool = option(
        True, "low-rank + diagonal covariance (true) or diagonal only", flag="swag_cov_mat", stage="train"
    )
    sample_scale: float = option(
        1.0, "factor on the sample standard deviation (0: the SWA mean)", flag="swag_sample_scale", stage="sample"
    )
    scale_convention: ScaleConvention = option(
        ScaleConvention.STD,
        "std: --swag_sample_scale multiplies the standard deviation of the ½-covariance; swag_lora: it is swag-lora's "
        "scale, on the covariance without the ½ (its 1.0 is std's √2)",
        flag="swag_scale_convention",
        stage="sample",
    )

    @property
    def std_scale(self) -> float:
        """The sample scale in this library's convention."""
        return std_scale(self.sample_scale, self.scale_convention)

    def __post_init__(self) -> None:
        coerce_enums(self)
        epoch, step, lr = self.start_epoch, self.start_step, self.learning_rate
        require(epoch is None or step is None, "`start_epoch` is either an epoch or a step, not both")
        require(
            epoch is None or (math.isfinite(epoch) and epoch >= 0),
            f"`start_epoch` must be a non-negative epoch, got {epoch}",
        )
        require(step is None or step >= 0, f"`start_step` must be a non-negative step, got {step}")
        require(
            lr is None or (math.isfinite(lr) and lr >= 0), f"`learning_rate` must be a non-negative number, got {lr}"
        )
        a = self.anneal_epochs
        require(math.isfinite(a) and a >= 0, f"`anneal_epochs` must be a non-negative number, got {a}")
        every = self.collect_every
        require(every is None or every >= 0, f"`collect_every` must be a number of steps >= 0, got {every}")
        require(
            self.max_num_models >= 2 or not self.cov_mat,
            f"`max_num_models` must be at least 2 with `cov_mat` true, got {self.max_num_models}",
        )
        s = self.sample_scale
        require(math.isfinite(s) and s >= 0, f"`sample_scale` must be a non-negative number, got {s}")


def parse_swag_start(text: str) -> dict:
    """``--swag_start``: ``"2"`` / ``"1.5"`` (epochs) or ``"300steps"`` / ``"300 steps"`` (optimizer steps); the
    ``SwagOptions`` fields it sets."""
    value = text.strip().lower()
    for suffix in ("steps", "step"):
        if value.endswith(suffix):
            number = value[: -len(suffix)].strip()
            if number.isdigit():
                return {"start_step": int(number), "start_epoch": None}
            break
    try:
        return {"start_epoch": float(value), "start_step": None}
    except ValueError:
        raise OptionError(
            f"`start_epoch` must be an epoch (2, 1.5) or a step count (300steps), got {text!r}"
        ) from None


# --- the parameters SWAG covers ------------------------------------------------------------------------------------
def _template(name: str, adapter_name: str) -> str:
    return ".".join(ADAPTER if part == adapter_name else part for part in name.split("."))


def _resolve(template: str, adapter_name: str) -> str:
    return ".".join(adapter_name if part == ADAPTER else part for part in template.split("."))


def trainable_names(model, adapter_name: str | None = None) -> list[str]:
    """Templated names (adapter name -> ``{adapter}``) of the trainable parameters of ``model``, in module order."""
    adapter_name = adapter_name or getattr(model, "active_adapter", "default")
    names = [_template(n, adapter_name) for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise InputError("SWAG needs trainable adapter parameters; this model has none")
    return names


def _lookup(model, names: Sequence[str], adapter_name: str) -> list[torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if _resolve(n, adapter_name) not in params]
    if missing:
        raise InputError(
            f"the SWAG posterior covers other adapter weights: {_resolve(missing[0], adapter_name)} is not in this "
            f"model (adapter {adapter_name!r})"
        )
    return [params[_resolve(n, adapter_name)] for n in names]


def flatten(params: Sequence[torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """(P,) float64 copy of the parameters, in order."""
    return torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64) for p in params])


def loaded(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context with the flat (P,) vector ``flat`` in ``params`` (cast to each one's dtype), restored on exit."""
    return swapped_weights(params, flat.split([p.numel() for p in params]))


# --- collection ------------------------------------------------------------------------------------------------------
class SwagCollector(TrainerCallback):
    """``TrainerCallback`` collecting SWAG's moments of the trainable parameters of ``model`` (see module docstring).

    Attach it with ``trainer.add_callback(collector)`` (or ``callbacks=[collector]``); after ``trainer.train()``,
    ``collector.posterior()`` is the :class:`Swag` posterior and ``collector.save(folder)`` writes it (rank 0 only).

    Args:
        model: The ``PeftModel`` being trained (not a DDP wrapper); its trainable parameters are collected.
        options: :class:`SwagOptions`.
        steps_per_epoch: Optimizer steps per epoch; default: as the Trainer counts them (its train dataloader's
            length over the gradient accumulation steps, per process).
        device: Where the float64 moments live (``"cpu"``, or the parameters' device).

    Collection happens after optimizer step ``start + k * collect_every`` (k = 1, 2, ...), or at every epoch end
    after the start; ``collected_steps`` lists them. ``learning_rates`` maps each step after the start to the
    learning rate it used (first parameter group).
    """

    def __init__(
        self,
        model,
        options: SwagOptions | None = None,
        steps_per_epoch: int | None = None,
        device="cpu",
        name_of: Callable[[str], str] | None = None,
    ):
        self.model, self.options = model, options or SwagOptions()
        self.name_of = name_of  # how errors name the options' fields (the scripts: their flags)
        self.adapter_name = getattr(model, "active_adapter", "default")
        self.names = trainable_names(model, self.adapter_name)
        self.params = _lookup(model, self.names, self.adapter_name)
        self.device = device
        self.steps_per_epoch = steps_per_epoch
        self.start: int | None = None  # resolved at train begin
        self.n_models = 0
        numel = sum(p.numel() for p in self.params)
        self.mean = torch.zeros(numel, dtype=torch.float64, device=device)
        self.sq_mean = torch.zeros_like(self.mean)
        self.deviations: deque[torch.Tensor] = deque(maxlen=self.options.max_num_models)
        self.collected_steps: list[int] = []
        self.learning_rates: dict[int, float] = {}
        self._start_lrs: list[float] | None = None

    # --- the schedule ------------------------------------------------------------------------------------------------
    def start_step(self, max_steps: int) -> int:
        """The optimizer step after which collection starts."""
        opts, per_epoch = self.options, self.steps_per_epoch or 1
        if opts.start_step is not None:
            return opts.start_step
        if opts.start_epoch is not None:
            return int(round(opts.start_epoch * per_epoch))
        return max_steps // 2

    def anneal_factor(self, k: int) -> float:
        """α of the k-th step after the start (k = 0, 1, ...): lr = (1 − α) lr_start + α swag_lr."""
        opts = self.options
        anneal_steps = int(round(opts.anneal_epochs * (self.steps_per_epoch or 1)))
        if opts.anneal_strategy == "constant" or anneal_steps == 0:
            return 1.0
        t = min(1.0, (k + 1) / anneal_steps)
        return t if opts.anneal_strategy == "linear" else (1 - math.cos(math.pi * t)) / 2

    # --- Trainer events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.steps_per_epoch is None:
            if train_dataloader is None or not hasattr(train_dataloader, "__len__"):
                raise InputError("SWAG needs the steps per epoch: pass steps_per_epoch to SwagCollector")
            self.steps_per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
        self.start = self.start_step(state.max_steps)
        if self.start >= state.max_steps:
            field = "start_step" if self.options.start_step is not None else "start_epoch"
            err = OptionError(
                f"`{field}` is at step {self.start}, at or after the end of training ({state.max_steps} steps): no "
                "model would be collected"
            )
            raise InputError(err.render(self.name_of)) if self.name_of else err

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Runs after the Trainer's scheduler set this step's learning rate: override it from the start on.
        if self.options.learning_rate is None or self.start is None or state.global_step < self.start:
            return
        groups = optimizer.param_groups
        if self._start_lrs is None:
            self._start_lrs = [g["lr"] for g in groups]
        alpha = self.anneal_factor(state.global_step - self.start)
        for group, lr0 in zip(groups, self._start_lrs):
            group["lr"] = (1 - alpha) * lr0 + alpha * self.options.learning_rate
        self.learning_rates[state.global_step + 1] = groups[0]["lr"]

    def on_step_end(self, args, state, control, **kwargs):
        every = self.options.collect_every
        if every and self.start is not None and state.global_step > self.start:
            if (state.global_step - self.start) % every == 0:
                self.collect(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.options.collect_every and self.start is not None and state.global_step > self.start:
            if not self.collected_steps or self.collected_steps[-1] != state.global_step:
                self.collect(state.global_step)

    # --- moments ---------------------------------------------------------------------------------------------------
    def collect(self, step: int | None = None) -> None:
        """Adds the current trainable weights as one more model (normally called by the Trainer events)."""
        theta = flatten(self.params, self.device)
        n = self.n_models
        self.mean.mul_(n / (n + 1)).add_(theta / (n + 1))
        self.sq_mean.mul_(n / (n + 1)).add_(theta.square() / (n + 1))
        if self.options.cov_mat:
            self.deviations.append(theta - self.mean)
        self.n_models += 1
        self.collected_steps.append(step if step is not None else -1)

    def posterior(self) -> Swag:
        """The :class:`Swag` posterior of what was collected, tied to the model's current (final) weights."""
        if self.n_models == 0:
            raise InputError("SWAG collected no model: --swag_start is after the last collection point of training")
        dev = torch.stack(list(self.deviations)) if self.deviations else self.mean.new_zeros((0, self.mean.numel()))
        swag = Swag(self.model, self.names, [tuple(p.shape) for p in self.params], self.adapter_name)
        swag.set_moments(self.mean, self.sq_mean, dev, self.n_models)
        swag.options, swag.sample_scale, swag.cov_mat = self.options, self.options.std_scale, self.options.cov_mat
        swag.collected_steps, swag.fingerprint = list(self.collected_steps), weights_fingerprint(self.params)
        return swag

    def save(self, folder: str) -> str:
        """Writes the posterior to ``folder`` on rank 0 (every rank collected the same); all ranks wait for it."""
        if is_main_process():
            self.posterior().save(folder)
        barrier()
        return folder


# --- the posterior ---------------------------------------------------------------------------------------------------
def sample_scale_from_args(posterior, args) -> None:
    """``--swag_sample_scale`` (in ``--swag_scale_convention``) on a loaded SWAG or MultiSWAG posterior."""
    if args.swag_sample_scale is not None:
        posterior.sample_scale = std_scale(args.swag_sample_scale, args.swag_scale_convention or "std")


def _swag_flag(name: str) -> str:
    return "--" + flag_name(SwagOptions, name)


def swag_options(args) -> SwagOptions:
    """SwagOptions from train.py's flags (the dataclass defaults where a flag was not given)."""

    def build() -> SwagOptions:
        start = parse_swag_start(args.swag_start) if args.swag_start is not None else {}
        return SwagOptions(**option_values(SwagOptions, args), **start)

    return with_flag_names(SwagOptions, build)


class Swag(Posterior):
    """SWAG posterior over the trainable tensors of one adapter of a ``PeftModel`` (see the module docstring).

    Built by :class:`SwagCollector` during training, or loaded with ``load_posterior(model, folder)`` /
    :meth:`Swag.load` (any adapter name, for MultiSWAG). ``sample_scale`` and ``cov_mat`` may be changed before
    sampling.
    """

    name: ClassVar[str] = "swag"
    accepts: ClassVar[tuple[str, ...]] = (*flags_of(SwagOptions), "swag_export_swa")
    train_time: ClassVar[bool] = True  # train.py --posterior swag: moments collected by a callback

    def __init__(self, model, names: Sequence[str], shapes: Sequence[Sequence[int]], adapter_name: str = "default"):
        super().__init__(model)
        self.names, self.adapter_name = list(names), adapter_name
        self.params = _lookup(model, self.names, adapter_name)
        found = [tuple(p.shape) for p in self.params]
        for n, want, got in zip(self.names, shapes, found):
            if tuple(want) != got:
                raise InputError(f"the SWAG posterior covers other adapter weights: {n} is {got}, saved {tuple(want)}")
        self.options = SwagOptions()
        self.sample_scale, self.cov_mat = self.options.std_scale, self.options.cov_mat
        self.mean_vec: torch.Tensor | None = None
        self.sq_mean = self.deviations = None
        self.n_models, self.collected_steps, self.fingerprint = 0, [], None

    def set_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, deviations: torch.Tensor, n_models: int) -> None:
        """θ̄ (P,), mean θ² (P,), D as rows (K, P), the number of collected models; float64 copies on the CPU."""
        numel = sum(p.numel() for p in self.params)
        if mean.shape != (numel,) or sq_mean.shape != (numel,) or deviations.shape[1:] != (numel,):
            raise InputError(f"SWAG moments do not fit the {numel} adapter weights of this model")
        cpu = {"device": "cpu", "dtype": torch.float64}
        self.mean_vec, self.sq_mean, self.deviations = mean.to(**cpu), sq_mean.to(**cpu), deviations.to(**cpu)
        self.n_models = int(n_models)

    @property
    def variance(self) -> torch.Tensor:
        """σ² = mean θ² − θ̄², clamped at 0 (float cancellation can make it slightly negative)."""
        return (self.sq_mean - self.mean_vec.square()).clamp_min(0)

    @property
    def rank(self) -> int:
        """K, the number of deviation columns the samples use (0: diagonal only)."""
        k = self.deviations.shape[0]
        return k if self.cov_mat and k >= 2 else 0

    # --- what evaluation asks ---------------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        """(n, P) float64 samples θ̄ + s (σ ⊙ z₁ / √2 + D z₂ / √(2 (K − 1))) (diagonal only: θ̄ + s σ ⊙ z₁)."""
        if self.cov_mat and self.deviations.shape[0] < 2:
            raise InputError("--swag_cov_mat true needs at least 2 collected deviations; this posterior has fewer")
        z1 = torch.randn((n, self.mean_vec.numel()), generator=generator, dtype=torch.float64)
        noise = self.variance.sqrt() * z1
        k = self.rank
        if k:
            z2 = torch.randn((n, k), generator=generator, dtype=torch.float64)
            noise = noise / math.sqrt(2) + (z2 @ self.deviations) / math.sqrt(2 * (k - 1))
        return self.mean_vec + self.sample_scale * noise

    def mean(self) -> contextlib.AbstractContextManager:
        """Context with the SWA mean θ̄ in the adapter weights."""
        return loaded(self.params, self.mean_vec)

    def sample(self, seed: int) -> contextlib.AbstractContextManager:
        """Context with one sample drawn from a generator seeded by ``seed`` only."""
        return loaded(self.params, self.draw(torch.Generator().manual_seed(seed))[0])

    def export_swa(self, folder: str) -> str:
        """Writes the SWA mean as a plain PEFT adapter (``save_pretrained``) that ``PeftModel.from_pretrained``
        loads; written through a temporary folder, files moved in one by one. Returns ``folder``."""

        def write(staging: str) -> str:
            with self.mean():
                self.model.save_pretrained(staging, selected_adapters=[self.adapter_name], safe_serialization=True)
            return staging if self.adapter_name == "default" else os.path.join(staging, self.adapter_name)

        return write_files_into(folder, write, ".swa-")

    # --- persistence ------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "options": asdict(self.options),
            "sample_scale": self.sample_scale,
            "cov_mat": self.cov_mat,
            "names": self.names,
            "shapes": [list(p.shape) for p in self.params],
            "n_models": self.n_models,
            "collected_steps": self.collected_steps,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean_vec is None:
            raise InputError("the SWAG posterior holds no moments yet")
        return {"mean": self.mean_vec, "sq_mean": self.sq_mean, "deviations": self.deviations}

    @classmethod
    def from_config(cls, model, config: dict, adapter_name: str | None = None) -> Swag:
        adapter_name = adapter_name or getattr(model, "active_adapter", "default")
        try:
            swag = cls(model, config["names"], config["shapes"], adapter_name)
            swag.options = SwagOptions(**config["options"])
        except (KeyError, TypeError) as err:
            raise InputError(f"saved SWAG posterior: unreadable config ({err})") from None
        return swag

    def load_state_dict(self, state: dict[str, torch.Tensor], config: dict) -> None:
        if config.get("fingerprint") != weights_fingerprint(self.params):
            raise InputError(
                f"the saved SWAG posterior was collected while training other weights than adapter "
                f"{self.adapter_name!r} holds (fingerprint differs)"
            )
        try:
            self.set_moments(state["mean"], state["sq_mean"], state["deviations"], config["n_models"])
        except KeyError as err:
            raise InputError(f"saved SWAG posterior: missing {err}") from None
        self.sample_scale, self.cov_mat = float(config["sample_scale"]), bool(config["cov_mat"])
        self.collected_steps, self.fingerprint = list(config.get("collected_steps", [])), config["fingerprint"]

    # --- the scripts: collected by train.py, loaded by evaluate.py ---------------------------------------------
    @classmethod
    def add_flags(cls, parser, training: bool) -> None:
        title = "SWAG (train.py --posterior swag collects; evaluate.py --posterior swag|multiswag)"
        g = parser.add_argument_group(title)
        if training:
            g.add_argument(
                "--swag_start",
                default=None,
                help="collect from this epoch (2, 1.5) or step (300steps); default: half way through training",
            )
            add_option_flags(g, SwagOptions, stage="train")
            g.add_argument(
                "--swag_export_swa",
                type=str2bool,
                nargs="?",
                const=True,
                default=None,
                help="also write the SWA mean as a plain PEFT adapter to <output_dir>/swa",
            )
        add_option_flags(g, SwagOptions, stage="sample")

    @classmethod
    def check_args(cls, args) -> None:
        if hasattr(args, "swag_collect_every"):  # train.py: the options' own checks
            swag_options(args)
        options_from_args(SwagOptions, args, include=["sample_scale", "scale_convention"])  # the sample flags
        if getattr(args, "resume_from_checkpoint", None):
            raise InputError(
                "--posterior swag cannot resume from a checkpoint: the collected SWAG moments are not "
                "saved in checkpoints; train again from the start"
            )

    @classmethod
    def collector(cls, args, model, steps_per_epoch: int) -> SwagCollector:
        return SwagCollector(model, swag_options(args), steps_per_epoch=steps_per_epoch, name_of=_swag_flag)

    @classmethod
    def after_training(cls, work, collector) -> None:
        """The collected posterior next to the adapter (rank 0), and the SWA mean as a plain adapter with
        ``--swag_export_swa`` (with the run's train_args.json: its prompt template is the run's)."""

        args = work.args
        folder = collector.save(posterior_folder(args.output_dir, cls.name))
        if is_main_process():
            steps = collector.collected_steps
            print(f"SWAG: {collector.n_models} models collected after optimizer steps {steps}; saved to {folder}")
            if args.swag_export_swa:
                swa = collector.posterior().export_swa(os.path.join(args.output_dir, "swa"))
                shutil.copy2(os.path.join(args.output_dir, "train_args.json"), os.path.join(swa, "train_args.json"))
                print(f"SWA mean saved as a plain adapter to {swa}")

    @classmethod
    def from_args(cls, work) -> Swag:
        folder = posterior_folder(require_adapter(work.args, cls.name), cls.name)
        if not os.path.isdir(folder):
            raise InputError(f"no saved SWAG posterior in {folder}: train with train.py --posterior swag")
        posterior = cls.load_saved(work.model, folder)
        sample_scale_from_args(posterior, work.args)
        return posterior

    @classmethod
    def load(cls, model, folder: str, adapter_name: str | None = None) -> Swag:
        """The SWAG posterior saved in ``folder``, over adapter ``adapter_name`` of ``model`` (default: active)."""
        config, state = read_saved(folder)
        if config.get("posterior") != cls.name:
            raise InputError(f"{folder}: holds a {config.get('posterior')!r} posterior, not swag")
        swag = cls.from_config(model, config, adapter_name)
        swag.load_state_dict(state, config)
        return swag
