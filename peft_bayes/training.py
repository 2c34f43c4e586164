"""The ``transformers.Trainer`` used by train.py and its callbacks: library code, usable without the scripts.

- [`PeftBayesTrainer`] stops on a non-finite loss, trains the letter format's K-way loss, and with a Bayesian LoRA
  adapter adds its KL term one of two ways (``bayes_optimizer``):

  - ``blob`` (default), BLoB's own optimisation (Wang et al. 2024, as their released code runs it): the NLL alone
    goes through the Trainer's AdamW, which does **not** hold ``bayeslora_rho``; after each AdamW step a second,
    plain SGD ([`BlobKLOptimizer`], learning rate ``kllr`` with the same linear warm-up and decay) steps
    ``pi_t * KL``, pi_t on a global step counter of cycle length M (``blob_kl_weight``). So rho moves by
    ``dNLL/drho + pi_t dKL/drho`` through SGD and the Bayesian factor's mean by ``pi_t dKL/dM`` on top of its AdamW
    step. Unlike Adam, whose step is about the learning rate whatever the gradient, SGD follows the KL's pull
    (``~1/rho``), so sigma can grow from its eps^2 start.
  - ``single``: the earlier path, one AdamW over everything on ``NLL + kl_weight * schedule(step) * KL / N``.

- Every training log of a Bayesian adapter carries the KL (nats, summed over the Bayesian factors), the term added
  and sigma's mean / median / max; ``sigma_history`` keeps them for ``train_args.json``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback

from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum
from peft_bayes.posterior.likelihood import letter_logits, letter_nll
from peft_bayes.tuners.bayeslora import (
    BayesLoraConfig,
    bayes_layers,
    blob_cycle_length,
    blob_kl_weight,
    kl_divergence,
    kl_schedule_factor,
)


class BayesOptimizer(OptionEnum):
    """How a Bayesian LoRA adapter's KL is optimised (see the module docstring)."""

    BLOB = "blob"
    SINGLE = "single"


BAYES_OPTIMIZERS = BayesOptimizer.values()
KL_OPTIMIZER_STATE = "blob_kl_optimizer.pt"


class NonFiniteLossError(InputError):
    """Training produced a NaN or infinite loss (usually a learning rate too high for the precision)."""


def _active_factors(model):
    """(layer, adapter name) of every active Bayesian factor, in module order."""
    for _, layer in bayes_layers(model):
        for name in layer.active_adapters:
            if name in layer.bayeslora_rho:
                yield layer, name


def bayes_parameters(model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(means, rhos): the posterior mean weight and ``bayeslora_rho`` of every active Bayesian factor, in order."""
    factors = list(_active_factors(model))
    return [layer.bayes_factor(n).weight for layer, n in factors], [layer.bayeslora_rho[n] for layer, n in factors]


@torch.no_grad()
def sigma_stats(model) -> dict[str, float]:
    """Mean, median and max of the posterior std over every entry of every active Bayesian factor ({} without)."""
    stds = [layer.posterior_std(name).detach().float().flatten().cpu() for layer, name in _active_factors(model)]
    if not stds:
        return {}
    s = torch.cat(stds)
    return {"sigma_mean": s.mean().item(), "sigma_median": s.median().item(), "sigma_max": s.max().item()}


class BlobKLOptimizer(TrainerCallback):
    """BLoB's second optimiser: plain SGD on ``kl_weight * pi_t * KL`` after every optimizer step of the Trainer.

    It holds the Bayesian factors' means and ``bayeslora_rho``. At ``on_optimizer_step`` (after AdamW stepped the
    NLL, before the Trainer clears the gradients) rho still holds its NLL gradient (it is in no other optimiser;
    under DDP it was all-reduced like every gradient); the KL gradient is added to it, the means get the KL gradient
    alone, and SGD steps both. Every process computes the same KL of the same weights, so every rank takes the same
    step. Its learning rate follows ``kllr`` times the Trainer's linear warm-up and decay.

    Args:
        model: The (PEFT) model with an active Bayesian LoRA adapter.
        cycle: M, the KL cycle length in optimizer steps (``blob_cycle_length``).
        kllr: SGD learning rate (BLoB's ``--bayes-kllr``; 0.01 in its scripts).
        warmup_steps, total_steps: The linear schedule (the Trainer's).
        kl_weight: Factor on the KL (1 in BLoB).
    """

    def __init__(self, model, cycle: int, kllr: float, warmup_steps: int, total_steps: int, kl_weight: float = 1.0):
        from transformers import get_linear_schedule_with_warmup

        self.model, self.cycle, self.kl_weight = model, int(cycle), float(kl_weight)
        self.means, self.rhos = bayes_parameters(model)
        if not self.rhos:
            raise ValueError("BlobKLOptimizer needs a model with an active Bayesian LoRA adapter")
        self.sgd = torch.optim.SGD(self.means + self.rhos, lr=kllr)
        self.scheduler = get_linear_schedule_with_warmup(self.sgd, warmup_steps, max(total_steps, 1))
        self.window: dict[int, tuple[float, float]] = {}  # optimizer step -> (KL, pi * KL)
        self.last: tuple[float, float] | None = None

    def step(self, step: int) -> None:
        """The KL step of optimizer step ``step`` (1-based): SGD on ``kl_weight * pi_step * KL``."""
        pi = blob_kl_weight(step, self.cycle)
        kl = kl_divergence(self.model)
        term = self.kl_weight * pi * kl
        grads = torch.autograd.grad(term, self.means + self.rhos)
        n = len(self.means)
        for p, g in zip(self.means, grads[:n]):  # AdamW already stepped the NLL: the mean moves by the KL alone
            p.grad = g.to(p.dtype)
        for p, g in zip(self.rhos, grads[n:]):  # rho: its NLL gradient (in no other optimiser) + the KL's
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
        self.sgd.step()
        self.scheduler.step()
        self.sgd.zero_grad(set_to_none=True)
        self.window[step] = self.last = (kl.item(), term.item())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step(state.global_step + 1)  # global_step counts the steps completed before this one

    # --- checkpoints: the SGD state and its schedule travel with checkpoint-N ---------------------------------
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            state_dict = {"sgd": self.sgd.state_dict(), "scheduler": self.scheduler.state_dict()}
            state_dict["cycle"], state_dict["step"] = self.cycle, state.global_step
            torch.save(state_dict, os.path.join(folder, KL_OPTIMIZER_STATE))

    def load(self, checkpoint: str) -> None:
        """Restores the SGD and its schedule from a ``checkpoint-N`` folder saved during a ``blob`` run."""
        path = os.path.join(checkpoint, KL_OPTIMIZER_STATE)
        if not os.path.isfile(path):
            raise InputError(
                f"--resume_from_checkpoint {checkpoint!r} has no {KL_OPTIMIZER_STATE}: it was not saved by a "
                "--bayes_optimizer blob run"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["cycle"] != self.cycle:
            raise InputError(f"{path}: saved with KL cycle M = {saved['cycle']}, this run has M = {self.cycle}")
        self.sgd.load_state_dict(saved["sgd"])
        self.scheduler.load_state_dict(saved["scheduler"])


def warn_short_run(total_steps: int, cycle: int) -> bool:
    """Warns (once, returns True) when a ``blob`` run ends before its first KL cycle: pi stays below 2^-(M - T)."""
    if total_steps >= cycle:
        return False
    warnings.warn(
        f"--bayes_optimizer blob: the run has {total_steps} optimizer steps, fewer than one KL cycle (M = {cycle}); "
        f"the KL weight stays below 2^-{cycle - total_steps + 1}, so sigma cannot move from its start. Train for at "
        "least M steps, or shorten the cycle (--bayes_datasetrescaling false: M = steps per epoch)",
        UserWarning,
        stacklevel=2,
    )
    return True


class LetterCollator:
    """Right-pads letter-format examples (``tokenize_letter_record``): ``input_ids``, ``attention_mask``,
    ``choice_ids`` (B, K_max, -1 padded) and ``choice_label`` (B,). There are no ``labels``: the loss is the K-way
    letter loss of [`PeftBayesTrainer`], not the LM loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        k = max(len(r["choice_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        choices = torch.full((len(rows), k), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
            choices[i, : len(r["choice_ids"])] = torch.tensor(r["choice_ids"])
        labels = torch.tensor([r["choice_label"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "choice_ids": choices, "choice_label": labels}


class PeftBayesTrainer(Trainer):
    """``Trainer`` that refuses to continue on a NaN/inf loss, trains letter-format batches on their K-way loss, and
    adds a Bayesian LoRA adapter's KL (see the module docstring for the two ``bayes_optimizer`` paths).

    Args:
        n_train: Number of training examples N (needed with a Bayesian LoRA adapter).
        steps_per_epoch: Optimizer steps per epoch (the ``single`` path's ``blob`` schedule cycles per epoch).
        bayes_optimizer: ``"blob"`` or ``"single"``.
        kl_cycle: The ``blob`` path's M (default: ``blob_cycle_length`` of ``n_train`` and the global batch).
        kllr: The ``blob`` path's SGD learning rate (BLoB's scripts: 0.01).
        total_steps: Optimizer steps of the run, for the SGD's schedule (default: ``args.max_steps``, else the
            epochs' steps).
    """

    def __init__(
        self,
        *args,
        n_train: int | None = None,
        steps_per_epoch: int = 1,
        bayes_optimizer: str = "blob",
        kl_cycle: int | None = None,
        kllr: float = 0.01,
        total_steps: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        config = getattr(self.model, "active_peft_config", None)
        self.bayes_config = config if isinstance(config, BayesLoraConfig) else None
        if self.bayes_config is not None and not n_train:
            raise ValueError("a Bayesian LoRA adapter needs n_train (the training-set size) for its KL term")
        if bayes_optimizer not in BAYES_OPTIMIZERS:
            raise ValueError(f"bayes_optimizer must be one of {BAYES_OPTIMIZERS}, got {bayes_optimizer!r}")
        self.n_train, self.steps_per_epoch = n_train, steps_per_epoch
        self.bayes_optimizer = bayes_optimizer
        self._kl_window: dict[int, tuple[float, float]] = {}  # single path: optimizer step -> (KL, term)
        self._last_kl: tuple[float, float] | None = None
        self.sigma_history: list[dict] = []
        self.kl_optimizer: BlobKLOptimizer | None = None
        if self.bayes_config is not None and bayes_optimizer == "blob":
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            batch *= self.args.world_size
            per_epoch = max(math.ceil(n_train / batch), 1)
            total = total_steps or self.args.max_steps
            if total is None or total <= 0:
                total = max(math.ceil(per_epoch * self.args.num_train_epochs), 1)
            if kl_cycle is None:
                kl_cycle = blob_cycle_length(n_train, batch, per_epoch)
            warmup = self.args.get_warmup_steps(total)
            self.kl_optimizer = BlobKLOptimizer(self.model, kl_cycle, kllr, warmup, total, self.bayes_config.kl_weight)
            self.add_callback(self.kl_optimizer)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; on the ``blob`` path without ``bayeslora_rho`` (BLoB's AdamW never holds it)."""
        if self.kl_optimizer is None or self.optimizer is not None:
            return super().create_optimizer(model)
        rhos = self.kl_optimizer.rhos
        for p in rhos:  # excluded while the parameter groups are built, then trainable again
            p.requires_grad_(False)
        try:
            return super().create_optimizer(model)
        finally:
            for p in rhos:
                p.requires_grad_(True)

    def kl_term(self, num_items_in_batch=None) -> torch.Tensor:
        """The ``single`` path: this micro-batch's share of ``kl_weight * schedule(step) * KL / n_train``."""
        cfg, step = self.bayes_config, self.state.global_step
        factor = kl_schedule_factor(
            cfg.kl_schedule, step, self.steps_per_epoch, self.state.max_steps, cfg.kl_anneal_steps
        )
        kl = kl_divergence(self.model)
        term = cfg.kl_weight * factor / self.n_train * kl
        self._kl_window[step] = self._last_kl = (kl.item(), term.item())
        # Trainer divides each micro-batch's loss by the accumulation steps unless the model already normalised it
        # by the tokens of the whole accumulated batch; the KL term must count once per optimizer step either way.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return term / self.current_gradient_accumulation_steps if scaled else term

    def kl_summary(self) -> dict:
        """The last step's KL, KL term and sigma, and sigma's trajectory (for train_args.json); {} without a
        Bayesian adapter."""
        last = self.kl_optimizer.last if self.kl_optimizer is not None else self._last_kl
        if last is None:
            return {}
        out = {"final_kl_nats": last[0], "final_kl_term": last[1], "kl_n_train": self.n_train}
        out["bayes_optimizer"] = self.bayes_optimizer
        if self.kl_optimizer is not None:
            out["kl_cycle"] = self.kl_optimizer.cycle
        out.update({f"final_{k}": v for k, v in sigma_stats(self.model).items()})
        out["sigma_trajectory"] = self.sigma_history
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        window = self.kl_optimizer.window if self.kl_optimizer is not None else self._kl_window
        if "loss" in logs and self.bayes_config is not None:
            if window:
                kls, terms = zip(*window.values())
                logs["kl"] = sum(kls) / len(kls)
                logs["kl_term"] = sum(terms) / len(terms)
                # single path: the logged loss includes the KL term; blob path: the loss is the NLL alone
                logs["nll"] = logs["loss"] - logs["kl_term"] if self.kl_optimizer is None else logs["loss"]
                window.clear()
            logs.update(sigma_stats(self.model))
            self.sigma_history.append({"step": self.state.global_step, **{k: logs[k] for k in _HISTORY if k in logs}})
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "choice_ids" in inputs:  # the letter format: K-way cross-entropy over the letters' logits
            logits = letter_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["choice_ids"])
            loss = letter_nll(logits, inputs["choice_label"])
            result = (loss, {"logits": logits}) if return_outputs else loss
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            loss = result[0] if return_outputs else result
        if self.bayes_config is not None and self.kl_optimizer is None and model.training:
            loss = loss + self.kl_term(num_items_in_batch)
            result = (loss, result[1]) if return_outputs else loss
        if not torch.isfinite(loss.detach()).all():
            sys.stderr.write("\n")  # end the progress bar's line so the error stands on its own line
            raise NonFiniteLossError(
                f"the training loss became {loss.detach().float().item()} at step {self.state.global_step}; "
                "lower --learning_rate or use a wider precision"
            )
        return result

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints of a PEFT adapter hold its weights only: with ``lm_head`` among the targets PEFT would add the
        whole (tied) embedding matrix to every checkpoint ("auto"), 113 MB on SmolLM2-135M."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(
            output_dir, state_dict=state_dict, is_main_process=self.args.should_save, save_embedding_layers=False
        )
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "choice_ids" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with torch.no_grad():  # the validation loss of letter batches: the same K-way loss
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None


_HISTORY = ("loss", "nll", "kl", "kl_term", "sigma_mean", "sigma_median", "sigma_max", "learning_rate")


class NoUnscheduledFinalCheckpoint(TrainerCallback):
    """Keeps the Trainer from writing a checkpoint at the last step when none is due there.

    transformers' ``DefaultFlowCallback`` saves a full checkpoint (optimizer state included) at the end of every
    step-scheduled run, so ``--save_step 100000`` still left a ``checkpoint-1250/`` beside the adapter, which train.py
    saves itself. Runs after that callback and takes the end-of-run save back unless the step is a multiple of
    ``save_steps``, or ``load_best_model_at_end`` needs the last evaluation's checkpoint to compare."""

    def on_step_end(self, args, state, control, **kwargs):
        due = state.save_steps > 0 and state.global_step % state.save_steps == 0
        if state.global_step >= state.max_steps and not due and not args.load_best_model_at_end:
            control.should_save = False
        return control


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after each optimizer step, while gradients are still there."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft_model.base_model.update_and_allocate(state.global_step)
