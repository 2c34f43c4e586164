"""train.py: fine-tune a causal LM with any adapter, LLM-Adapters / alpaca-lora style, on ``transformers.Trainer``.

Flags and defaults follow LLM-Adapters' ``finetune.py`` so its command lines run unchanged. Everything that can be
wrong with the input (data, model path, adapter name, target modules, batch sizes) is checked before anything is
written, so a failed run leaves an existing ``--output_dir`` as it was.
"""

from __future__ import annotations

import argparse
import os

from transformers import set_seed

from peft_bayes.arguments import ArgumentParser
from peft_bayes.cli.common import TRAIN_ARGS, quiet_progress_bars_off_terminal
from peft_bayes.cli.posterior_flags import add_posterior_flags, check_posterior_flags, workflow
from peft_bayes.data.choices import CHOICE_FORMATS
from peft_bayes.data.loading import is_choice_data, tokenize_records, training_records
from peft_bayes.data.prompts import CHAT
from peft_bayes.errors import InputError
from peft_bayes.io import write_files_into, write_json_atomic
from peft_bayes.models import LoadOptions, check_base_model, load_prompter, load_training_model, local_rank, world_size
from peft_bayes.options import add_option_flags, default_of, flag_fields, flag_name, options_from_args
from peft_bayes.posterior import posterior_class
from peft_bayes.posterior.distributed import close_process_group
from peft_bayes.train_config import BayesTrainingOptions, TrainOptions, make_trainer
from peft_bayes.training import warn_short_run
from peft_bayes.tuners import BayesLoraConfig
from peft_bayes.tuners import catalogue as adapters

# --recipe: the defaults of the authors' scripts (bayesian-peft scripts/blob/blob-llama-all.sh), any flag overrides.
RECIPES = {
    "blob": {
        "adapter_name": "bayeslora",
        "choice_format": "letter",
        "learning_rate": 1e-4,
        "adam_epsilon": 1e-6,
        "warmup_ratio": 0.06,
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 5000,
        "max_grad_norm": 0.0,
        "cutoff_len": 300,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "lm_head"],
        "bayes_eps": 0.05,
        "prior_std": 0.2,
        "bayes_optimizer": "blob",
        "bayes_kllr": 0.01,
        "bayes_gamma": 8.0,
        "bayes_datasetrescaling": True,
    }
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with ``--recipe``'s defaults applied before the explicit flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    recipe = pre.parse_known_args(argv)[0].recipe
    parser = build_parser()
    if recipe in RECIPES:
        parser.set_defaults(**RECIPES[recipe])
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--recipe",
        default=None,
        choices=sorted(RECIPES),
        help="preset defaults: blob = every setting of BLoB's scripts (README); each flag still overrides",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--base_model", required=True, help="local model directory, Hub id or smollm2-135m (packaged)")
    g.add_argument("--data_path", default="yahma/alpaca-cleaned", help="JSON/JSONL file, folder or Hub dataset")
    g.add_argument("--output_dir", default="./lora-alpaca")
    g.add_argument(
        "--prompt_template",
        default="alpaca",
        help="shipped template name, a template JSON file, or chat (the tokenizer's chat template)",
    )
    g.add_argument(
        "--choice_format",
        default="label",
        choices=CHOICE_FORMATS,
        help="multiple-choice records: label = train on their output as written (LLM-Adapters); cloze = the "
        "question alone -> the gold option's text (parsed from the instruction); letter = the lettered question, "
        "loss = cross-entropy over the K letter tokens' logits at 'Answer:' (BLoB, Laplace-LoRA, SWAG-LoRA)",
    )
    add_option_flags(g, LoadOptions, defaults=True)
    add_option_flags(p.add_argument_group("training"), TrainOptions, defaults=True)
    adapters.add_adapter_flags(p)
    g = p.add_argument_group("Bayesian LoRA (--adapter_name bayeslora)")
    add_option_flags(g, BayesLoraConfig, defaults=True)
    add_option_flags(g, BayesTrainingOptions, defaults=True)
    add_posterior_flags(p, training=True)
    return p


def bayes_flags_changed(args: argparse.Namespace) -> list[str]:
    """BayesLoRA's flags whose value is not their default (given for another adapter, they are an error)."""
    fields = [(cls, f) for cls in (BayesLoraConfig, BayesTrainingOptions) for f in flag_fields(cls)]
    return [f"--{flag_name(c, f.name)}" for c, f in fields if getattr(args, flag_name(c, f.name)) != default_of(f)]


def check_args(args: argparse.Namespace, world: int) -> tuple[TrainOptions, BayesTrainingOptions]:
    """Validates every flag before anything is read or written; returns the run's options."""
    options = options_from_args(TrainOptions, args)
    options.accumulation(world)
    check_posterior_flags(args)
    bayes = options_from_args(BayesTrainingOptions, args)
    bayeslora = adapters.adapter_spec(args.adapter_name).bayesian
    if bayeslora and bayes.optimizer == "blob" and options.precision == "fp16":
        raise InputError("--bayes_optimizer blob steps rho outside the loss-scaled optimizer: use bf16 or fp32")
    if args.resume_from_checkpoint and not os.path.isdir(args.resume_from_checkpoint):
        raise InputError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such directory")
    adapters.check_adapter_args(args)
    changed = [] if bayeslora else bayes_flags_changed(args)
    if changed:
        raise InputError(f"{', '.join(changed)} apply to --adapter_name bayeslora only (got {args.adapter_name})")
    return options, bayes


def load_data(args):
    """Loads and splits the records and the prompt template: all data errors surface before the model loads
    (``--prompt_template chat`` reads the base model's tokenizer for its chat template, after the records)."""
    prompter = None if args.prompt_template == CHAT else load_prompter(args.prompt_template, args.base_model)
    train, val = training_records(args.data_path, args.choice_format, args.val_set_size, args.seed)
    prompter = prompter or load_prompter(args.prompt_template, args.base_model, args.trust_remote_code)
    return prompter, train, val


def _load_adapter_weights(model, folder: str) -> None:
    """LLM-Adapters' resume from a bare adapter folder: weights only, schedule restarts."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        weights = load_peft_weights(folder, device="cpu")
    except Exception as err:  # a folder without adapter weights, a foreign format, ...
        raise InputError(f"--resume_from_checkpoint {folder!r} holds no adapter weights ({err})") from None
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise InputError(
            f"--resume_from_checkpoint {folder!r} does not fit this adapter: unexpected weights "
            f"{result.unexpected_keys[:3]}"
        )


def save_final(model, tokenizer, args, extra: dict) -> None:
    """Adapter (safetensors) + adapter_config.json + tokenizer + resolved arguments, moved in file by file."""

    def write(staging: str) -> None:
        # A head adapter (lm_head in the targets) saves its LoRA weights only, never the (tied) embedding matrix.
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(staging)
        write_json_atomic(os.path.join(staging, TRAIN_ARGS), {**vars(args), **extra})

    write_files_into(args.output_dir, write, ".final-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_progress_bars_off_terminal()
    world = world_size()
    options, bayes = check_args(args, world)
    check_base_model(args.base_model, args.trust_remote_code)  # a missing model is named before any data check
    set_seed(args.seed)  # before the adapter is created: its initial weights come from this seed
    prompter, train_records, val_records = load_data(args)
    load = options_from_args(LoadOptions, args)
    model, tokenizer = load_training_model(args.base_model, load, options.use_gradient_checkpointing)
    train_data, val_data = (_tokenized(args, options, tokenizer, prompter, r) for r in (train_records, val_records))
    accum = options.accumulation(world)
    total = options.total_steps(len(train_data), accum, world)
    model, peft_config = _attach(args, model, total)
    if local_rank() == 0:
        model.print_trainable_parameters()
        print(
            f"adapter {args.adapter_name}: targets {_targets_of(peft_config)}; {len(train_data)} train / "
            f"{len(val_data)} val examples; {total} optimizer steps; grad accumulation {accum} x {world} process(es)"
        )
    letter = args.choice_format == "letter"
    trainer = make_trainer(model, tokenizer, (train_data, val_data), options, bayes, args.output_dir, letter, world)
    if trainer.kl_optimizer is not None and local_rank() == 0:
        cycle = trainer.kl_optimizer.cycle
        print(f"bayeslora: BLoB optimizers (AdamW on the NLL, SGD lr {bayes.kllr} on pi * KL), KL cycle M = {cycle}")
        warn_short_run(total, cycle)
    posterior = posterior_class(args.posterior)
    per_epoch = options.steps_per_epoch(len(train_data), accum, world)
    collector = posterior.collector(args, model, per_epoch)  # e.g. SWAG's moments, collected by a callback
    if collector is not None:
        trainer.add_callback(collector)
    full_resume = _full_resume(args.resume_from_checkpoint)
    if full_resume and trainer.kl_optimizer is not None:
        trainer.kl_optimizer.load(full_resume)
    result = trainer.train(resume_from_checkpoint=full_resume)
    if trainer.is_world_process_zero():
        sizes = {"n_train": len(train_data), "n_val": len(val_data)}
        save_final(model, tokenizer, args, _run_record(trainer, result, peft_config, world, accum, sizes))
        print(f"saved adapter to {args.output_dir} (train loss {result.training_loss:.4f})")
    # every rank (a Laplace fit: each fits its share of the data, rank 0 saves)
    posterior.after_training(workflow(args, model, tokenizer, prompter, is_choice_data(args.data_path)), collector)
    close_process_group(exit_after=True)  # under torchrun the rank ends here: its outputs are written
    return 0


def _tokenized(args, options: TrainOptions, tokenizer, prompter, records) -> list[dict]:
    where = args.data_path
    cutoff, on_inputs = options.cutoff_len, options.train_on_inputs
    return tokenize_records(records, tokenizer, prompter, cutoff, on_inputs, args.choice_format, where)


def _attach(args, model, total_steps: int):
    """The adapter of ``--adapter_name`` on ``model`` (with the weights of a bare adapter folder to resume from):
    (the PeftModel, its config)."""
    peft_config = adapters.build_peft_config(args, model.config.model_type, total_steps)
    model = adapters.attach_adapter(model, peft_config)
    if args.resume_from_checkpoint and not _full_resume(args.resume_from_checkpoint):
        _load_adapter_weights(model, args.resume_from_checkpoint)
    return model, peft_config


def _full_resume(folder: str | None) -> str | None:
    """``folder`` when it is a Trainer checkpoint (a full resume), None for a bare adapter folder or none."""
    return folder if folder and os.path.isfile(os.path.join(folder, "trainer_state.json")) else None


def _run_record(trainer, result, peft_config, world: int, accum: int, sizes: dict) -> dict:
    """What train_args.json records beside the flags: the run as it happened."""
    return {
        "world_size": world,
        "gradient_accumulation_steps": accum,
        "optimizer_steps": trainer.state.global_step,
        "target_modules_resolved": _targets_of(peft_config),
        "train_loss": result.training_loss,
        "mixed_precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        **trainer.kl_summary(),
        **sizes,
    }


def _targets_of(peft_config) -> list[str] | None:
    targets = getattr(peft_config, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
