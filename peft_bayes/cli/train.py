"""train.py: fine-tune a causal LM with any adapter, LLM-Adapters / alpaca-lora style, on ``transformers.Trainer``.

Flags and defaults follow LLM-Adapters' ``finetune.py`` so its command lines run unchanged. Everything that can be
wrong with the input (data, model path, adapter name, target modules, batch sizes) is checked before anything is
written, so a failed run leaves an existing ``--output_dir`` as it was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from peft_bayes.cli.common import (
    TRAIN_ARGS,
    ArgumentParser,
    comma_list,
    quiet_progress_bars_off_terminal,
    str2bool,
)
from peft_bayes.errors import InputError
from peft_bayes.io import write_files_into, write_json_atomic
from peft_bayes.models import pad_token_id
from peft_bayes.training import BAYES_OPTIMIZERS
from peft_bayes.tuners import catalogue as adapters
from peft_bayes.tuners.adapter_mlp import parse_scaling

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


def scaling_arg(value: str) -> float | str:
    try:
        return parse_scaling(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
        choices=["label", "cloze", "letter"],
        help="multiple-choice records: label = train on their output as written (LLM-Adapters); cloze = the "
        "question alone -> the gold option's text (parsed from the instruction); letter = the lettered question, "
        "loss = cross-entropy over the K letter tokens' logits at 'Answer:' (BLoB, Laplace-LoRA, SWAG-LoRA)",
    )
    g.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument("--load_8bit", type=str2bool, nargs="?", const=True, default=False, help="int8 base")
    g.add_argument("--load_4bit", type=str2bool, nargs="?", const=True, default=False, help="4-bit (QLoRA) base")
    g.add_argument("--bnb_4bit_quant_type", default="nf4", choices=["nf4", "fp4"])
    g.add_argument("--bnb_4bit_double_quant", type=str2bool, default=True, help="quantise the quantisation constants")
    g.add_argument(
        "--bnb_4bit_compute_dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16, bf16"
    )
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=128, help="global batch size (all processes, all micro-steps)")
    g.add_argument("--micro_batch_size", type=int, default=4, help="per-process batch per forward pass")
    g.add_argument("--num_epochs", type=float, default=3)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--learning_rate", type=float, default=3e-4)
    g.add_argument("--warmup_steps", type=int, default=100)
    g.add_argument(
        "--warmup_ratio",
        type=float,
        default=None,
        help="warm-up as a fraction of the steps (overrides --warmup_steps)",
    )
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's eps (BLoB: 1e-6)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: none, as BLoB)")
    g.add_argument("--cutoff_len", type=int, default=256, help="max tokens per example (longer ones are cut)")
    g.add_argument("--val_set_size", type=int, default=2000, help="examples held out for validation (0: none)")
    g.add_argument("--eval_step", type=int, default=200)
    g.add_argument("--save_step", type=int, default=200)
    g.add_argument("--save_total_limit", type=int, default=3)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument(
        "--train_on_inputs",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="if false, the prompt is masked out of the loss (labels -100)",
    )
    g.add_argument("--group_by_length", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument("--use_gradient_checkpointing", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint-N folder (full resume) or an adapter folder (weights only)",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="mixed precision; auto = bf16 on a GPU that has it, else fp32",
    )
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--report_to", default="none", help="transformers reporting integrations (e.g. wandb)")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter_name", default="lora", help="one of: " + ", ".join(adapters.ADAPTERS))
    g.add_argument(
        "--target_modules",
        type=comma_list,
        default=None,
        help="comma-separated module names; default: per-architecture table (README)",
    )
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--oft_block_size", type=int, default=32)
    g.add_argument("--num_virtual_tokens", type=int, default=30)
    g.add_argument("--encoder_hidden_size", type=int, default=128, help="p-tuning prompt encoder width")
    g = p.add_argument_group("bottleneck and parallel adapters")
    g.add_argument("--bottleneck_size", type=int, default=256, help="adapter hidden width")
    g.add_argument("--non_linearity", default="tanh", choices=["tanh", "relu", "gelu", "silu"])
    g.add_argument("--adapter_dropout", type=float, default=0.0)
    g.add_argument(
        "--scaling",
        type=scaling_arg,
        default=None,
        help="output factor s: a number or 'learned' (default 1; 4 for scaled_parallel)",
    )
    g.add_argument(
        "--adapter_init",
        default="identity",
        choices=["identity", "bert"],
        help="identity: up-projection zero (starts at the base model); bert: N(0, 0.02) as LLM-Adapters",
    )
    g.add_argument(
        "--use_parallel_adapter", type=str2bool, nargs="?", const=True, default=False, help="bottleneck: parallel"
    )
    g.add_argument("--use_adapterp", type=str2bool, nargs="?", const=True, default=False, help="bottleneck: AdapterP")
    g = p.add_argument_group("Bayesian LoRA (--adapter_name bayeslora)")
    g.add_argument("--prior_std", type=float, default=0.2, help="std of the N(0, prior_std^2) prior (BLoB: 0.2)")
    g.add_argument("--bayes_eps", type=float, default=0.05, help="sigma starts at u^2, u ~ U(eps/sqrt(2), eps)")
    g.add_argument(
        "--bayes_std_param", default="square", choices=["square", "softplus"], help="sigma = rho^2 or softplus(rho)"
    )
    g.add_argument("--flipout", type=str2bool, nargs="?", const=True, default=True, help="per-token flipout signs")
    g.add_argument(
        "--kl_schedule", default="blob", choices=["blob", "constant", "linear"], help="KL weighting per step"
    )
    g.add_argument("--kl_weight", type=float, default=1.0, help="factor on KL / N_train in the loss")
    g.add_argument("--kl_anneal_steps", type=int, default=None, help="linear schedule: warm-up steps (default: all)")
    g.add_argument("--bayesian_factor", default="A", choices=["A", "B"], help="the LoRA factor with a posterior")
    g.add_argument(
        "--bayes_optimizer",
        default="blob",
        choices=list(BAYES_OPTIMIZERS),
        help="blob = BLoB's two optimizers: AdamW on the NLL (without rho), plain SGD on pi_t * KL and rho; single = "
        "one AdamW on NLL + kl_weight * --kl_schedule * KL / N (the earlier path, a baseline)",
    )
    g.add_argument("--bayes_kllr", type=float, default=0.01, help="blob: the KL optimizer's SGD learning rate")
    g.add_argument("--bayes_gamma", type=float, default=8.0, help="blob: gamma of the cycle M = 100 N^(pi/gamma)/B")
    g.add_argument(
        "--bayes_datasetrescaling",
        type=str2bool,
        default=True,
        help="blob: the KL cycle M from the data-set size (BLoB); false: M = optimizer steps per epoch",
    )
    _add_posterior_flags(p)
    return p


def _add_posterior_flags(p) -> None:
    from peft_bayes.cli.posterior_flags import add_posterior_flags

    add_posterior_flags(p, training=True)


def check_args(args: argparse.Namespace, world: int) -> int:
    """Validates sizes; returns the gradient accumulation steps = batch_size / micro_batch_size / world size."""
    if args.micro_batch_size <= 0 or args.batch_size <= 0:
        raise InputError("--batch_size and --micro_batch_size must be positive")
    if args.batch_size % args.micro_batch_size:
        raise InputError(f"--micro_batch_size {args.micro_batch_size} does not divide --batch_size {args.batch_size}")
    steps = args.batch_size // args.micro_batch_size
    if steps % world:
        raise InputError(
            f"--batch_size {args.batch_size} / --micro_batch_size {args.micro_batch_size} = {steps} "
            f"micro-batches is not divisible by the {world} processes"
        )
    from peft_bayes.cli.posterior_flags import check_posterior_flags

    check_posterior_flags(args)
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.adapter_name.lower() == "bayeslora" and args.bayes_optimizer == "blob":
        if args.bayes_kllr < 0 or args.bayes_gamma <= 0:
            raise InputError("--bayes_kllr must be >= 0 and --bayes_gamma positive")
        if args.precision == "fp16":
            raise InputError("--bayes_optimizer blob steps rho outside the loss-scaled optimizer: use bf16 or fp32")
    if args.cutoff_len < 8:
        raise InputError(f"--cutoff_len must be at least 8, got {args.cutoff_len}")
    if args.resume_from_checkpoint and not os.path.isdir(args.resume_from_checkpoint):
        raise InputError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such directory")
    spec = adapters.adapter_spec(args.adapter_name)
    if (args.load_4bit or args.load_8bit) and not spec.quantized_ok:
        raise InputError(f"--adapter_name {args.adapter_name} does not support a quantized base (--load_4bit/8bit)")
    if args.use_gradient_checkpointing and not spec.checkpointing_ok:
        raise InputError(f"--adapter_name {args.adapter_name} cannot be combined with --use_gradient_checkpointing")
    bayes_flags = {"prior_std": 0.2, "bayes_eps": 0.05, "bayes_std_param": "square", "flipout": True}
    bayes_flags |= {"kl_schedule": "blob", "kl_weight": 1.0, "kl_anneal_steps": None, "bayesian_factor": "A"}
    bayes_flags |= {"bayes_optimizer": "blob", "bayes_kllr": 0.01, "bayes_gamma": 8.0, "bayes_datasetrescaling": True}
    if args.adapter_name.lower() != "bayeslora":
        changed = [f"--{k}" for k, default in bayes_flags.items() if getattr(args, k) != default]
        if changed:
            raise InputError(f"{', '.join(changed)} apply to --adapter_name bayeslora only (got {args.adapter_name})")
    for flag in ("use_parallel_adapter", "use_adapterp"):
        if getattr(args, flag) and args.adapter_name.lower() != "bottleneck":
            raise InputError(f"--{flag} applies to --adapter_name bottleneck only (got {args.adapter_name})")
    return steps // world


def _precision(args: argparse.Namespace) -> tuple[bool, bool]:
    import torch

    if args.precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bf16, False
    if args.precision != "fp32" and not torch.cuda.is_available():
        raise InputError(f"--precision {args.precision} needs a GPU; use fp32 on CPU")
    return args.precision == "bf16", args.precision == "fp16"


def load_data(args):
    """Loads and splits the records and the prompt template: all data errors surface before the model loads
    (``--prompt_template chat`` reads the base model's tokenizer for its chat template, after the records)."""
    from peft_bayes.data import load_records, split_train_val
    from peft_bayes.data.prompts import CHAT
    from peft_bayes.models import load_prompter

    prompter = None if args.prompt_template == CHAT else load_prompter(args.prompt_template, args.base_model)
    records = load_records(args.data_path, split="train")
    if args.choice_format == "cloze":  # question -> gold option text, as evaluate.py --choice_format cloze scores
        from peft_bayes.data.choices import cloze_training_record

        records = [cloze_training_record(r, f"{args.data_path}: record {i}") for i, r in enumerate(records)]
    train, val = split_train_val(records, args.val_set_size, args.seed)
    prompter = prompter or load_prompter(args.prompt_template, args.base_model, args.trust_remote_code)
    return prompter, train, val


def tokenize_all(records, tokenizer, prompter, args) -> list[dict]:
    from peft_bayes.data import tokenize_letter_record, tokenize_record

    if args.choice_format == "letter":  # context ids, the K letter ids and the gold index (the K-way loss)
        where = f"{args.data_path}: record"
        return [
            tokenize_letter_record(r, tokenizer, prompter, args.cutoff_len, f"{where} {i}")
            for i, r in enumerate(records)
        ]
    return [tokenize_record(r, tokenizer, prompter, args.cutoff_len, args.train_on_inputs) for r in records]


def load_model(args):
    """Base model + tokenizer + attached adapter, all validated."""
    import torch

    from peft_bayes.models import (
        check_model_source,
        load_base_model,
        load_tokenizer,
        parse_dtype,
    )

    if args.bnb_4bit_compute_dtype == "auto":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        compute = parse_dtype(args.bnb_4bit_compute_dtype)
    base = check_model_source(args.base_model, "base model")  # a packaged name becomes its cached folder
    tokenizer = load_tokenizer(base, args.trust_remote_code, padding_side="left")
    quantized = args.load_8bit or args.load_4bit
    model = load_base_model(
        base,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        dtype=compute if quantized else None,
        quant_type=args.bnb_4bit_quant_type,
        double_quant=args.bnb_4bit_double_quant,
        trust_remote_code=args.trust_remote_code,
    )
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.use_gradient_checkpointing)
    elif args.use_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def warmup_steps(args, total_steps: int) -> int:
    """Warm-up steps: ``ceil(--warmup_ratio * steps)`` when given, else ``--warmup_steps``; below the total."""
    steps = math.ceil(args.warmup_ratio * total_steps) if args.warmup_ratio is not None else args.warmup_steps
    return min(steps, max(total_steps - 1, 0))


def _training_arguments(args, accum: int, total_steps: int, has_val: bool):
    import torch
    from transformers import TrainingArguments

    bf16, fp16 = _precision(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    steps_kw = (
        {"eval_strategy": "steps", "eval_steps": args.eval_step, "load_best_model_at_end": True}
        if has_val
        else {"eval_strategy": "no"}
    )
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=warmup_steps(args, total_steps),
        weight_decay=args.weight_decay,
        adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm,
        bf16=bf16,
        fp16=fp16,
        logging_steps=args.logging_steps,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=args.save_step,
        save_total_limit=args.save_total_limit,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to=[] if args.report_to == "none" else comma_list(args.report_to),
        seed=args.seed,
        data_seed=args.seed,
        ddp_find_unused_parameters=False if distributed else None,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        # use_cpu makes accelerate treat a torchrun launch without GPUs as MULTI_CPU (DDP over gloo), not as
        # independent processes; pin_memory only helps with an accelerator.
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),  # off a terminal: the log lines every --logging_steps, no bar
        **steps_kw,
    )


def _steps_per_epoch(args, n_train: int, accum: int, world: int) -> int:
    return max(math.ceil(n_train / (args.micro_batch_size * world)) // accum, 1)


def _total_steps(args, n_train: int, accum: int, world: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(int(math.ceil(_steps_per_epoch(args, n_train, accum, world) * args.num_epochs)), 1)


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
    from peft_bayes.models import check_base_model, local_rank, world_size

    args = parse_args(argv)
    quiet_progress_bars_off_terminal()
    world = world_size()
    accum = check_args(args, world)
    check_base_model(args.base_model, args.trust_remote_code)  # a missing model is named before any data check
    from transformers import set_seed

    set_seed(args.seed)  # before the adapter is created: its initial weights come from this seed
    prompter, train_records, val_records = load_data(args)
    model, tokenizer = load_model(args)
    train_data = tokenize_all(train_records, tokenizer, prompter, args)
    val_data = tokenize_all(val_records, tokenizer, prompter, args)
    total = _total_steps(args, len(train_data), accum, world)
    peft_config = adapters.build_peft_config(args, model.config.model_type, total)
    model = adapters.attach_adapter(model, peft_config)
    if args.resume_from_checkpoint and not os.path.isfile(
        os.path.join(args.resume_from_checkpoint, "trainer_state.json")
    ):
        _load_adapter_weights(model, args.resume_from_checkpoint)
    if local_rank() == 0:
        model.print_trainable_parameters()
        print(
            f"adapter {args.adapter_name}: targets {_targets_of(peft_config)}; {len(train_data)} train / "
            f"{len(val_data)} val examples; {total} optimizer steps; grad accumulation {accum} x {world} process(es)"
        )
    per_epoch = _steps_per_epoch(args, len(train_data), accum, world)
    trainer = _make_trainer(args, model, tokenizer, train_data, val_data, accum, total, per_epoch)
    if trainer.kl_optimizer is not None:
        if local_rank() == 0:
            print(f"bayeslora: BLoB optimizers (AdamW on the NLL, SGD lr {args.bayes_kllr} on pi * KL), KL cycle "
                  f"M = {trainer.kl_optimizer.cycle} steps")  # fmt: skip
            from peft_bayes.training import warn_short_run

            warn_short_run(total, trainer.kl_optimizer.cycle)
    from peft_bayes.cli.posterior_flags import workflow
    from peft_bayes.data.loading import is_choice_data
    from peft_bayes.posterior import posterior_class

    posterior = posterior_class(args.posterior)
    collector = posterior.collector(args, model, per_epoch)  # e.g. SWAG's moments, collected by a callback
    if collector is not None:
        trainer.add_callback(collector)
    full_resume = (
        args.resume_from_checkpoint
        if args.resume_from_checkpoint
        and os.path.isfile(os.path.join(args.resume_from_checkpoint, "trainer_state.json"))
        else None
    )
    if full_resume and trainer.kl_optimizer is not None:
        trainer.kl_optimizer.load(full_resume)
    result = trainer.train(resume_from_checkpoint=full_resume)
    if trainer.is_world_process_zero():
        save_final(
            model,
            tokenizer,
            args,
            {
                "world_size": world,
                "gradient_accumulation_steps": accum,
                "optimizer_steps": trainer.state.global_step,
                "target_modules_resolved": _targets_of(peft_config),
                "train_loss": result.training_loss,
                "mixed_precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
                **trainer.kl_summary(),
                "n_train": len(train_data),
                "n_val": len(val_data),
            },
        )
        print(f"saved adapter to {args.output_dir} (train loss {result.training_loss:.4f})")
    # every rank (a Laplace fit: each fits its share of the data, rank 0 saves)
    work = workflow(args, model, tokenizer, prompter, is_choice_data(args.data_path))
    posterior.after_training(work, collector)
    from peft_bayes.posterior.distributed import close_process_group

    close_process_group()
    return 0


def _targets_of(peft_config) -> list[str] | None:
    targets = getattr(peft_config, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def _make_trainer(args, model, tokenizer, train_data, val_data, accum, total, steps_per_epoch):
    from transformers import DataCollatorForSeq2Seq

    from peft_bayes.training import AdaLoraCallback, LetterCollator, NoUnscheduledFinalCheckpoint, PeftBayesTrainer
    from peft_bayes.tuners.bayeslora import blob_cycle_length

    model.config.use_cache = False
    if args.choice_format == "letter":
        collator = LetterCollator(pad_token_id(tokenizer))
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    cycle = blob_cycle_length(
        len(train_data), args.batch_size, steps_per_epoch, args.bayes_gamma, args.bayes_datasetrescaling
    )
    trainer = PeftBayesTrainer(
        model=model,
        args=_training_arguments(args, accum, total, bool(val_data)),
        train_dataset=train_data,
        eval_dataset=val_data or None,
        data_collator=collator,
        n_train=len(train_data),
        steps_per_epoch=steps_per_epoch,
        bayes_optimizer=args.bayes_optimizer,
        kl_cycle=cycle,
        kllr=args.bayes_kllr,
        total_steps=total,
    )
    trainer.add_callback(NoUnscheduledFinalCheckpoint())
    if args.adapter_name.lower() == "adalora":
        trainer.add_callback(AdaLoraCallback(model))
    return trainer
