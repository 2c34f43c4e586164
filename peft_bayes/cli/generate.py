"""generate.py: talk to a base model or an adapter — a streaming terminal REPL, a one-shot mode, or a Gradio page.

The REPL prints the response token by token as it is generated (plain stdout, so it works over SSH). Beam search
cannot stream: with ``--num_beams`` > 1 the response is printed when complete.

With ``--posterior NAME`` (or ``--samples N``) each answer is followed by how sure the posterior is of it: the
answer's tokens teacher-forced under N weight draws (Bayesian-model-average probability, predictive and expected
entropy, mutual information), N answers sampled one per draw and their agreement, and a summary line; ``--json``
prints every number instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from threading import Thread

from peft_bayes.arguments import ArgumentParser
from peft_bayes.cli import evaluate
from peft_bayes.cli.common import (
    add_model_flags,
    add_recorded_flags,
    apply_recorded_settings,
    quiet_progress_bars_off_terminal,
)
from peft_bayes.cli.generate_ui import launch_ui
from peft_bayes.cli.posterior_flags import add_posterior_flags, check_posterior_flags, resolve_posterior
from peft_bayes.errors import InputError
from peft_bayes.evaluation.answer_uncertainty import AnswerAnalyzer, generate_samples
from peft_bayes.evaluation.draws import main_context
from peft_bayes.evaluation.uncertainty import AnswerUncertainty, Thresholds
from peft_bayes.models import check_base_model, load_prompter, model_device, tokenizer_source
from peft_bayes.posterior import posterior_class

QUIT_WORDS = ("exit", "quit", ":q")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    add_model_flags(p, "adapter folder (optional)")
    p.add_argument("--instruction", default=None, help="one-shot mode: answer this instruction and exit")
    p.add_argument("--input", default=None, help="optional input section for --instruction")
    p.add_argument("--ui", action="store_true", help="start a Gradio page instead of the terminal REPL")
    p.add_argument("--share", action="store_true", help="with --ui: a public Gradio link")
    p.add_argument("--server_name", default="127.0.0.1", help="with --ui: interface to listen on")
    p.add_argument("--server_port", type=int, default=7860)
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.1, help="0 means greedy decoding")
    g.add_argument("--top_p", type=float, default=0.75)
    g.add_argument("--top_k", type=int, default=40)
    g.add_argument("--num_beams", type=int, default=1)
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed sampling for reproducible answers")
    _add_uncertainty_flags(p)
    add_recorded_flags(p)
    return p


def _add_uncertainty_flags(p: argparse.ArgumentParser) -> None:
    add_posterior_flags(p, training=False)
    p.set_defaults(posterior=None)  # not given: no uncertainty shown (unless --samples), the adapter's own weights
    g = p.add_argument_group("uncertainty of each answer (with --posterior or --samples)")
    g.add_argument(
        "--samples",
        type=int,
        default=None,
        help="N posterior draws per answer (default: the posterior's, at most 8; 0 for a point estimate)",
    )
    g.add_argument("--uncertainty_seed", type=int, default=0, help="seed of the N draws (the same for every answer)")
    g.add_argument("--mark_top", type=int, default=3, help="mark this many of the answer's most uncertain tokens")
    g.add_argument("--no_color", action="store_true", help="plain markers [[...]] instead of colour in a terminal")
    g.add_argument("--json", action="store_true", help="print one JSON object per answer with every number")
    g.add_argument("--answer_task", default="auto",
                   help="how sampled answers are grouped: auto (by the final number when the answer has one, else by "
                   "normalised text), text, or a task name (gsm8k, boolq, ...) for its answer extraction")  # fmt: skip


def generation_kwargs(args) -> dict:
    """``model.generate`` keyword arguments that carry the flags (validated)."""
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.num_beams < 1:
        raise InputError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0, --num_beams >= 1")
    if args.max_new_tokens <= 0:
        raise InputError("--max_new_tokens must be positive")
    sample = args.temperature > 0
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": sample,
        "repetition_penalty": args.repetition_penalty,
    }
    if sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kw


class Responder:
    """Holds model, tokenizer and prompt template; yields the response text as it grows. With an ``analyzer``
    (an [`AnswerAnalyzer`]) the answer is generated under the posterior's main weights and ``respond`` adds its
    uncertainty; ``last`` holds the (prompt ids, generated ids) of the latest answer."""

    def __init__(self, model, tokenizer, prompter, gen_kwargs: dict, seed: int | None = None, analyzer=None,
                 color: bool = False, as_json: bool = False):  # fmt: skip
        self.model, self.tokenizer, self.prompter, self.gen_kwargs, self.seed = (
            model,
            tokenizer,
            prompter,
            gen_kwargs,
            seed,
        )
        self.analyzer, self.color, self.as_json = analyzer, color, as_json
        self.last: tuple | None = None

    def _context(self):
        return main_context(self.analyzer.posterior) if self.analyzer else contextlib.nullcontext()

    def stream(self, instruction: str, input: str | None = None, **overrides):
        """Yields successive pieces of the response (one piece in total when beam search is on)."""
        import torch
        from transformers import TextIteratorStreamer

        kw = {**self.gen_kwargs, **overrides}
        prompt = self.prompter.generate_prompt(instruction, input)
        device = model_device(self.model)
        enc = self.tokenizer(prompt, return_tensors="pt").to(device)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        if kw.get("num_beams", 1) > 1:
            with torch.inference_mode(), self._context():
                out = self.model.generate(**enc, **kw, pad_token_id=self.tokenizer.pad_token_id)
            self.last = (enc["input_ids"], out[0, enc["input_ids"].shape[1] :])
            yield self.tokenizer.decode(self.last[1], skip_special_tokens=True)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = Thread(target=self._generate, args=(enc, kw, streamer), daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def _generate(self, enc, kw, streamer):
        import torch

        with torch.inference_mode(), self._context():
            out = self.model.generate(**enc, **kw, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id)
        self.last = (enc["input_ids"], out[0, enc["input_ids"].shape[1] :])

    def uncertainty(self, progress=None) -> AnswerUncertainty:
        """The latest answer's uncertainty under the analyzer's posterior."""
        return self.analyzer.analyse(*self.last, progress=progress)

    def respond(self, instruction: str, input: str | None = None, out=None) -> str:
        """Streams the response to ``out`` (if given), then its uncertainty when there is an analyzer (one JSON
        object instead with ``as_json``), and returns the response whole."""
        pieces = []
        for piece in self.stream(instruction, input):
            pieces.append(piece)
            if out is not None and not self.as_json:
                out.write(piece)
                out.flush()
        text = "".join(pieces)
        if out is None:
            return text
        if self.as_json:
            record = {"instruction": instruction, "input": input, "response": text}
            if self.analyzer:
                record["uncertainty"] = self.uncertainty().to_dict()
            out.write(json.dumps(record) + "\n")
        else:
            out.write("\n")
            if self.analyzer:
                out.write(render(self.uncertainty(), self.color) + "\n")
        out.flush()
        return text


RED, YELLOW, DIM, RESET = "\x1b[1;31m", "\x1b[33m", "\x1b[2m", "\x1b[0m"


def marked_answer(result: AnswerUncertainty, color: bool) -> str:
    """The answer with its most uncertain tokens marked: bold red in colour, else between [[ and ]]."""
    parts = []
    for i, token in enumerate(result.tokens):
        if i in result.marked:
            parts.append(f"{RED}{token}{RESET}" if color else f"[[{token}]]")
        else:
            parts.append(token)
    return "".join(parts)


def render(result: AnswerUncertainty, color: bool) -> str:
    """The terminal view of an answer's uncertainty: the summary line, the answer with its most uncertain tokens
    marked, and the sampled answers' vote."""
    word = result.summary_line()
    if color:
        word = (YELLOW if result.verdict != "confident" else DIM) + word + RESET
    lines = [f"-- {word}", f"   most uncertain tokens: {marked_answer(result, color).strip()}"]
    if result.agreement is not None:
        votes = " · ".join(f"{g['answer']!r} {g['votes']}/{result.agreement['n']}" for g in result.agreement["groups"])
        lines.append(f"   {result.agreement['n']} sampled answers: {votes}")
    return "\n".join(lines)


def repl(responder: Responder, stdin=None, stdout=None) -> None:
    """Reads instructions line by line until EOF or exit/quit; streams each response."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    stdout.write("Type an instruction and press Enter (exit, quit or Ctrl-D to leave).\n")
    while True:
        stdout.write("\n>>> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip().lower() in QUIT_WORDS:
            stdout.write("\n")
            return
        if line.strip():
            responder.respond(line.strip(), out=stdout)


def _check_uncertainty_flags(args) -> bool:
    """Whether each answer's uncertainty is shown; the posterior flags checked as evaluate.py checks them."""
    show = args.posterior is not None or args.samples is not None
    args.posterior = posterior_class(args.posterior or "auto").name
    if args.samples is not None and args.samples < 0:
        raise InputError(f"--samples must be 0 (the point estimate) or a number of draws, got {args.samples}")
    if args.mark_top < 0:
        raise InputError(f"--mark_top must be 0 or more tokens, got {args.mark_top}")
    check_posterior_flags(args)
    if args.samples and not posterior_class(args.posterior).may_sample(args):  # fail before loading the model
        raise InputError(f"--samples {args.samples}: --posterior {args.posterior} draws no weights for this adapter")
    return show


def _analyzer(args, model, tokenizer, prompter, gen_kwargs: dict) -> AnswerAnalyzer:
    """The posterior of the flags (fitted or loaded as evaluate.py does) and its N draws per answer."""
    posterior = resolve_posterior(args, model, tokenizer, prompter, False).for_generation()
    n = generate_samples(posterior, args.samples)
    return AnswerAnalyzer(posterior, tokenizer, n, args.uncertainty_seed, gen_kwargs, task=args.answer_task,
                          thresholds=Thresholds(marked=args.mark_top))  # fmt: skip


def use_color(args, stream) -> bool:
    """Colour only on a terminal, without --no_color and without NO_COLOR in the environment."""
    return not args.no_color and not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_progress_bars_off_terminal()
    note = apply_recorded_settings(args, {"prompt_template": "alpaca"})
    gen_kwargs = generation_kwargs(args)
    check_base_model(args.base_model, args.trust_remote_code)
    show = _check_uncertainty_flags(args)
    if args.ui and importlib.util.find_spec("gradio") is None:  # fail before minutes of model loading
        raise InputError("--ui needs gradio: pip install 'peft_bayes[ui]'")
    prompter = load_prompter(
        args.prompt_template, tokenizer_source(args.base_model, args.adapter), args.trust_remote_code
    )  # chat: tokenizer
    model, tokenizer = evaluate.load_eval_model(args)  # the same loading and checks as evaluate.py
    analyzer = _analyzer(args, model, tokenizer, prompter, gen_kwargs) if show else None
    if analyzer is not None:
        model = analyzer.posterior.model  # TFB's and an ensemble's posterior holds its own PeftModel
    if note:  # every check passed: the template taken from the adapter, in one line
        print(note, file=sys.stderr)
    responder = Responder(model, tokenizer, prompter, gen_kwargs, seed=args.seed, analyzer=analyzer,
                          color=use_color(args, sys.stdout), as_json=args.json)  # fmt: skip
    if args.instruction is not None:
        responder.respond(args.instruction, args.input, out=sys.stdout)
    elif args.ui:
        launch_ui(responder, args)
    else:
        repl(responder)
    return 0
