"""evaluate.py: batched greedy evaluation of a base model or an adapter on math and commonsense test sets.

Examples are sorted by prompt length and generated in batches with left padding, an attention mask and the KV
cache, then put back in dataset order. Per-example records and a summary are written as JSON.
"""

from __future__ import annotations

import argparse
import os
import time

from peft_bayes.cli import adapters
from peft_bayes.cli.common import ArgumentParser, str2bool, write_json_atomic
from peft_bayes.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--base_model", required=True, help="local model directory or Hub id")
    p.add_argument(
        "--adapter",
        "--lora_weights",
        dest="adapter",
        default=None,
        help="adapter folder saved by train.py (omit to evaluate the base model)",
    )
    p.add_argument(
        "--adapter_name", default=None, help="optional: check that --adapter holds this kind (lora, adapterh, ...)"
    )
    p.add_argument("--dataset", default=None, help="test set name, e.g. SVAMP, gsm8k, AQuA, boolq, ARC-Easy")
    p.add_argument(
        "--data_dir",
        default=os.environ.get("PEFT_BAYES_DATA_DIR", "dataset"),
        help="folder holding <dataset>/test.json (LLM-Adapters' layout); env PEFT_BAYES_DATA_DIR",
    )
    p.add_argument("--data_path", default=None, help="any JSON file in the schema (overrides --data_dir)")
    p.add_argument("--prompt_template", default="alpaca")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--output_dir", default="eval_results")
    p.add_argument("--load_8bit", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--load_4bit", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def resolve_dataset(args) -> tuple[str, str]:
    """(name, path) of the test file from --dataset / --data_dir / --data_path."""
    if args.data_path:
        name = args.dataset or os.path.splitext(os.path.basename(args.data_path))[0]
        return name, args.data_path
    if not args.dataset:
        raise InputError("give --dataset NAME (with --data_dir) or --data_path FILE")
    path = os.path.join(args.data_dir, args.dataset, "test.json")
    if not os.path.isfile(path):
        raise InputError(f"--dataset {args.dataset}: {path} not found (set --data_dir or --data_path)")
    return args.dataset, path


def load_eval_model(args):
    """Base model (+ adapter) in eval mode, and a left-padding tokenizer (the adapter's if it saved one)."""
    import torch
    from peft import PeftModel

    from peft_bayes.cli.modeling import check_model_source, load_base_model, load_tokenizer

    tok_source = (
        args.adapter
        if args.adapter and os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json"))
        else args.base_model
    )
    check_model_source(args.base_model, "base model")
    if args.adapter_name:
        if not args.adapter:
            raise InputError("--adapter_name needs --adapter (the adapter folder to check)")
        adapters.check_saved_adapter(args.adapter_name, args.adapter)
    tokenizer = load_tokenizer(tok_source, args.trust_remote_code, padding_side="left")
    model = load_base_model(
        args.base_model, load_8bit=args.load_8bit, load_4bit=args.load_4bit, trust_remote_code=args.trust_remote_code
    )
    if args.adapter:
        if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise InputError(f"--adapter {args.adapter!r}: no adapter_config.json there")
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except (ValueError, RuntimeError, KeyError) as err:
            raise InputError(
                f"--adapter {args.adapter!r} does not fit --base_model: {str(err).splitlines()[0]}"
            ) from None
    if torch.cuda.is_available() and not (args.load_8bit or args.load_4bit):
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def make_batches(lengths: list[int], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Indices grouped into batches, longest first; ``same_length`` never mixes lengths (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or (same_length and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


def _pads_safely(model) -> bool:
    # PEFT drops position_ids for prompt tuning and p-tuning, so a left-padded prompt would sit at shifted
    # absolute positions: those adapters are batched only with prompts of the same token length.
    config = getattr(model, "active_peft_config", None)
    return not (getattr(config, "is_prompt_learning", False) and config.peft_type != "PREFIX_TUNING")


def generate_batched(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, num_beams: int = 1, progress=None
) -> list[str]:
    """Greedy (or beam) continuations of ``prompts``, batched longest first; results in input order."""
    import torch

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    batches = make_batches(lengths, batch_size, same_length=not _pads_safely(model))
    outputs: list[str] = [""] * len(prompts)
    device = next(p.device for p in model.parameters())
    done = 0
    for idx in batches:
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
        for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return outputs


def score(records, generations, prompts, task) -> tuple[list[dict], int]:
    """Per-example records (prompt, generation, extracted, gold, correct) and the number correct."""
    from peft_bayes.data.answers import extract_answer, is_correct

    rows, n_correct = [], 0
    for rec, gen, prompt in zip(records, generations, prompts):
        pred = extract_answer(gen, task)
        ok = is_correct(pred, rec["answer"], task)
        n_correct += ok
        rows.append(
            {
                "instruction": rec["instruction"],
                "prompt": prompt,
                "generation": gen,
                "extracted": pred,
                "gold": rec["answer"],
                "correct": bool(ok),
            }
        )
    return rows, n_correct


def main(argv: list[str] | None = None) -> int:
    from peft_bayes.data import Prompter, load_records
    from peft_bayes.data.answers import TASKS, infer_task

    args = build_parser().parse_args(argv)
    if args.batch_size <= 0 or args.max_new_tokens <= 0 or args.num_beams <= 0:
        raise InputError("--batch_size, --max_new_tokens and --num_beams must be positive")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be a positive number of examples, got {args.limit}")
    name, path = resolve_dataset(args)
    records = load_records(path, required=("instruction", "answer"), split="test")[: args.limit]
    task = TASKS[name] if name in TASKS else infer_task(records, name)
    prompter = Prompter.from_name(args.prompt_template)
    model, tokenizer = load_eval_model(args)
    prompts = [prompter.generate_prompt(r["instruction"], r.get("input")) for r in records]

    def progress(done, total):
        if not args.quiet:
            print(f"\r{name}: {done}/{total}", end="" if done < total else "\n", flush=True)

    t0 = time.perf_counter()
    generations = generate_batched(
        model, tokenizer, prompts, args.batch_size, args.max_new_tokens, args.num_beams, progress
    )
    wall = time.perf_counter() - t0
    rows, n_correct = score(records, [prompter.get_response(g) for g in generations], prompts, task)
    summary = {
        "dataset": name,
        "data_path": path,
        "base_model": args.base_model,
        "adapter": args.adapter,
        "n": len(rows),
        "correct": n_correct,
        "accuracy": n_correct / len(rows),
        "accuracy_unit": "fraction",
        "wall_time_s": round(wall, 3),
        "examples_per_s": round(len(rows) / wall, 3),
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
    }
    stem = os.path.join(args.output_dir, name)
    write_json_atomic(stem + "_predictions.json", rows)
    write_json_atomic(stem + "_summary.json", summary)
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    print(
        f"\n| dataset | n | accuracy (%) | wall time (s) | examples/s |\n|---|---|---|---|---|\n"
        f"| {s['dataset']} | {s['n']} | {100 * s['accuracy']:.2f} | {s['wall_time_s']:.1f} | "
        f"{s['examples_per_s']:.2f} |"
    )
