"""The ``transformers.Trainer`` used by train.py: stops on a non-finite loss, drives AdaLoRA's rank allocation."""

from __future__ import annotations

import sys

import torch
from transformers import Trainer, TrainerCallback

from peft_bayes.errors import InputError


class NonFiniteLossError(InputError):
    """Training produced a NaN or infinite loss (usually a learning rate too high for the precision)."""


class PeftBayesTrainer(Trainer):
    """``Trainer`` that refuses to continue on a NaN/inf loss instead of silently training on garbage."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
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
