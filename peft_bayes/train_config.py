"""The settings of a training run and the ``Trainer`` they make: library code behind train.py.

:class:`TrainOptions` holds LLM-Adapters' ``finetune.py`` settings under their flag names and defaults;
:class:`BayesTrainingOptions` how a Bayesian LoRA adapter's KL term is optimised. :func:`training_arguments` turns
them into ``transformers.TrainingArguments``, :func:`make_trainer` into a [`PeftBayesTrainer`].
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from peft_bayes.arguments import comma_list
from peft_bayes.errors import InputError
from peft_bayes.models import pad_token_id
from peft_bayes.options import OptionEnum, coerce_enums, option, require
from peft_bayes.training import (
    AdaLoraCallback,
    BayesOptimizer,
    LetterCollator,
    NoUnscheduledFinalCheckpoint,
    PeftBayesTrainer,
)
from peft_bayes.tuners.bayeslora import blob_cycle_length


class Precision(OptionEnum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass
class TrainOptions:
    """The optimisation settings of a run (train.py's "training" flags, LLM-Adapters' names and defaults)."""

    batch_size: int = option(128, "global batch size (all processes, all micro-steps)")
    micro_batch_size: int = option(4, "per-process batch per forward pass")
    num_epochs: float = option(3, "passes over the training data")
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: epochs)")
    learning_rate: float = option(3e-4, "peak learning rate (linear warm-up, then linear decay)")
    warmup_steps: int = option(100, "warm-up steps")
    warmup_ratio: float | None = option(None, "warm-up as a fraction of the steps (overrides --warmup_steps)")
    weight_decay: float = option(0.0, "AdamW's weight decay")
    adam_epsilon: float = option(1e-8, "AdamW's eps (BLoB: 1e-6)")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none, as BLoB)")
    cutoff_len: int = option(256, "max tokens per example (longer ones are cut)")
    val_set_size: int = option(2000, "examples held out for validation (0: none)")
    eval_step: int = option(200, "validate every N optimizer steps")
    save_step: int = option(200, "checkpoint every N optimizer steps")
    save_total_limit: int = option(3, "checkpoints kept")
    logging_steps: int = option(10, "log every N optimizer steps")
    train_on_inputs: bool = option(True, "if false, the prompt is masked out of the loss (labels -100)")
    group_by_length: bool = option(False, "batch examples of similar length together")
    use_gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint-N folder (full resume) or an adapter folder (weights only)"
    )
    precision: Precision = option(Precision.AUTO, "mixed precision; auto = bf16 on a GPU that has it, else fp32")
    seed: int = option(42, "seed of the adapter's initial weights, the data order and the split")
    report_to: str = option("none", "transformers reporting integrations (e.g. wandb)")

    def __post_init__(self) -> None:
        coerce_enums(self)
        batch, micro = self.batch_size, self.micro_batch_size
        require(micro > 0 and batch > 0, "`batch_size` and `micro_batch_size` must be positive")
        require(batch % micro == 0, f"`micro_batch_size` {micro} does not divide `batch_size` {batch}")
        ratio = self.warmup_ratio
        require(ratio is None or 0 <= ratio < 1, f"`warmup_ratio` must be in [0, 1), got {ratio}")
        require(self.cutoff_len >= 8, f"`cutoff_len` must be at least 8, got {self.cutoff_len}")

    def accumulation(self, world: int) -> int:
        """Gradient accumulation steps = batch_size / micro_batch_size / world size (a one-line error where the
        micro-batches do not divide among the processes)."""
        steps = self.batch_size // self.micro_batch_size
        if steps % world:
            raise InputError(
                f"--batch_size {self.batch_size} / --micro_batch_size {self.micro_batch_size} = {steps} "
                f"micro-batches is not divisible by the {world} processes"
            )
        return steps // world

    def steps_per_epoch(self, n_train: int, accum: int, world: int) -> int:
        return max(math.ceil(n_train / (self.micro_batch_size * world)) // accum, 1)

    def total_steps(self, n_train: int, accum: int, world: int) -> int:
        """``max_steps`` when set, else the epochs' optimizer steps (at least 1)."""
        if self.max_steps > 0:
            return self.max_steps
        return max(int(math.ceil(self.steps_per_epoch(n_train, accum, world) * self.num_epochs)), 1)

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps: ``ceil(warmup_ratio * steps)`` when given, else ``warmup_steps``; below the total."""
        steps = math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps
        return min(steps, max(total_steps - 1, 0))

    def mixed_precision(self) -> tuple[bool, bool]:
        """(bf16, fp16) of the Trainer: auto = bf16 on a GPU that has it; fp16 / bf16 need a GPU."""
        if self.precision == "auto":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported(), False
        if self.precision != "fp32" and not torch.cuda.is_available():
            raise InputError(f"--precision {self.precision} needs a GPU; use fp32 on CPU")
        return self.precision == "bf16", self.precision == "fp16"


@dataclass
class BayesTrainingOptions:
    """How a Bayesian LoRA adapter's KL term is optimised (see ``peft_bayes.training``)."""

    optimizer: BayesOptimizer = option(
        BayesOptimizer.BLOB,
        "blob = BLoB's two optimizers: AdamW on the NLL (without rho), plain SGD on pi_t * KL and rho; single = one "
        "AdamW on NLL + kl_weight * --kl_schedule * KL / N (the earlier path, a baseline)",
        flag="bayes_optimizer",
    )
    kllr: float = option(0.01, "blob: the KL optimizer's SGD learning rate", flag="bayes_kllr")
    gamma: float = option(8.0, "blob: gamma of the cycle M = 100 N^(pi/gamma)/B", flag="bayes_gamma")
    dataset_rescaling: bool = option(
        True,
        "blob: the KL cycle M from the data-set size (BLoB); false: M = optimizer steps per epoch",
        flag="bayes_datasetrescaling",
    )

    def __post_init__(self) -> None:
        coerce_enums(self)
        require(self.kllr >= 0 and self.gamma > 0, "`kllr` must be >= 0 and `gamma` positive")


def training_arguments(options: TrainOptions, output_dir: str, accum: int, total_steps: int, has_val: bool):
    """``TrainingArguments`` of a run: LLM-Adapters' schedule, checkpoints and evaluation, DDP over gloo on CPUs."""
    from transformers import TrainingArguments

    o = options
    bf16, fp16 = o.mixed_precision()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.cuda.is_available()
    steps_kw = (
        {"eval_strategy": "steps", "eval_steps": o.eval_step, "load_best_model_at_end": True}
        if has_val
        else {"eval_strategy": "no"}
    )
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=o.micro_batch_size,
        per_device_eval_batch_size=o.micro_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=o.num_epochs,
        max_steps=o.max_steps,
        learning_rate=o.learning_rate,
        warmup_steps=o.warmup(total_steps),
        weight_decay=o.weight_decay,
        adam_epsilon=o.adam_epsilon,
        max_grad_norm=o.max_grad_norm,
        bf16=bf16,
        fp16=fp16,
        logging_steps=o.logging_steps,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=o.save_step,
        save_total_limit=o.save_total_limit,
        train_sampling_strategy="group_by_length" if o.group_by_length else "random",
        report_to=[] if o.report_to == "none" else comma_list(o.report_to),
        seed=o.seed,
        data_seed=o.seed,
        ddp_find_unused_parameters=False if distributed else None,
        ddp_backend="gloo" if distributed and not gpu else None,
        # use_cpu makes accelerate treat a torchrun launch without GPUs as MULTI_CPU (DDP over gloo), not as
        # independent processes; pin_memory only helps with an accelerator.
        use_cpu=not gpu,
        dataloader_pin_memory=gpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),  # off a terminal: the log lines every logging_steps, no bar
        **steps_kw,
    )


def make_trainer(
    model,
    tokenizer,
    data: tuple[list[dict], list[dict]],
    options: TrainOptions,
    bayes: BayesTrainingOptions,
    output_dir: str,
    letter: bool,
    world: int = 1,
) -> PeftBayesTrainer:
    """The Trainer of a run on ``data`` = (train, validation) tokenized examples: the letter format's collator (or a
    padding one), BLoB's KL cycle, AdaLoRA's callback; ``world`` processes."""
    from peft import AdaLoraConfig
    from transformers import DataCollatorForSeq2Seq

    train_data, val_data = data
    accum = options.accumulation(world)
    total = options.total_steps(len(train_data), accum, world)
    per_epoch = options.steps_per_epoch(len(train_data), accum, world)
    model.config.use_cache = False
    if letter:
        collator = LetterCollator(pad_token_id(tokenizer))
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    cycle = blob_cycle_length(len(train_data), options.batch_size, per_epoch, bayes.gamma, bayes.dataset_rescaling)
    trainer = PeftBayesTrainer(
        model=model,
        args=training_arguments(options, output_dir, accum, total, bool(val_data)),
        train_dataset=train_data,
        eval_dataset=val_data or None,
        data_collator=collator,
        n_train=len(train_data),
        steps_per_epoch=per_epoch,
        bayes_optimizer=bayes.optimizer,
        kl_cycle=cycle,
        kllr=bayes.kllr,
        total_steps=total,
    )
    trainer.add_callback(NoUnscheduledFinalCheckpoint())
    if isinstance(getattr(model, "active_peft_config", None), AdaLoraConfig):
        trainer.add_callback(AdaLoraCallback(model))
    return trainer
