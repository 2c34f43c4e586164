"""The ``transformers.Trainer`` used by train.py: stops on a non-finite loss, adds Bayesian LoRA's KL term to the
loss (and logs NLL and KL apart), drives AdaLoRA's rank allocation."""

from __future__ import annotations

import sys

import torch
from transformers import Trainer, TrainerCallback

from peft_bayes.errors import InputError
from peft_bayes.tuners.bayeslora import BayesLoraConfig, kl_divergence, kl_schedule_factor


class NonFiniteLossError(InputError):
    """Training produced a NaN or infinite loss (usually a learning rate too high for the precision)."""


class PeftBayesTrainer(Trainer):
    """``Trainer`` that refuses to continue on a NaN/inf loss instead of silently training on garbage.

    With a Bayesian LoRA adapter, the training loss is the negative ELBO per example,
    ``NLL + kl_weight * schedule(step) * KL(q || p) / n_train`` (BLoB's scaling by the data-set size), and every
    training log gets ``nll``, ``kl`` (nats, summed over all Bayesian factors) and ``kl_term`` (what was added).

    Args:
        n_train: Number of training examples N (needed with a Bayesian LoRA adapter).
        steps_per_epoch: Optimizer steps per epoch (M of the ``blob`` KL schedule).
    """

    def __init__(self, *args, n_train: int | None = None, steps_per_epoch: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        config = getattr(self.model, "active_peft_config", None)
        self.bayes_config = config if isinstance(config, BayesLoraConfig) else None
        if self.bayes_config is not None and not n_train:
            raise ValueError("a Bayesian LoRA adapter needs n_train (the training-set size) for its KL term")
        self.n_train, self.steps_per_epoch = n_train, steps_per_epoch
        self._kl_window: dict[int, tuple[float, float]] = {}  # optimizer step -> (KL, term added to the loss)
        self._last_kl: tuple[float, float] | None = None

    def kl_term(self, num_items_in_batch=None) -> torch.Tensor:
        """This micro-batch's share of ``kl_weight * schedule(step) * KL / n_train``."""
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
        """The last step's KL and KL term (for train_args.json); empty without a Bayesian adapter."""
        if self._last_kl is None:
            return {}
        return {"final_kl_nats": self._last_kl[0], "final_kl_term": self._last_kl[1], "kl_n_train": self.n_train}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._kl_window:
            kls, terms = zip(*self._kl_window.values())
            logs["kl"] = sum(kls) / len(kls)
            logs["kl_term"] = sum(terms) / len(terms)
            logs["nll"] = logs["loss"] - logs["kl_term"]
            self._kl_window.clear()
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if self.bayes_config is not None and model.training:
            loss = loss + self.kl_term(num_items_in_batch)
            result = (loss, result[1]) if return_outputs else loss
        if not torch.isfinite(loss.detach()).all():
            sys.stderr.write("\n")  # end the progress bar's line so the error stands on its own line
            raise NonFiniteLossError(
                f"the training loss became {loss.detach().float().item()} at step {self.state.global_step}; "
                "lower --learning_rate or use a wider precision"
            )
        return result


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after each optimizer step, while gradients are still there."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft_model.base_model.update_and_allocate(state.global_step)
