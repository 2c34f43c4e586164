"""generate.py: talk to a base model or an adapter — a streaming terminal REPL, a one-shot mode, or a Gradio page.

The REPL prints the response token by token as it is generated (plain stdout, so it works over SSH). Beam search
cannot stream: with ``--num_beams`` > 1 the response is printed when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from peft_bayes.errors import InputError
from peft_bayes.models import check_base_model, load_prompter, model_device, tokenizer_source

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
    add_recorded_flags(p)
    return p


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
    """Holds model, tokenizer and prompt template; yields the response text as it grows."""

    def __init__(self, model, tokenizer, prompter, gen_kwargs: dict, seed: int | None = None):
        self.model, self.tokenizer, self.prompter, self.gen_kwargs, self.seed = (
            model,
            tokenizer,
            prompter,
            gen_kwargs,
            seed,
        )

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
            with torch.inference_mode():
                out = self.model.generate(**enc, **kw, pad_token_id=self.tokenizer.pad_token_id)
            yield self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = Thread(target=self._generate, args=(enc, kw, streamer), daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def _generate(self, enc, kw, streamer):
        import torch

        with torch.inference_mode():
            self.model.generate(**enc, **kw, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id)

    def respond(self, instruction: str, input: str | None = None, out=None) -> str:
        """Streams the response to ``out`` (if given) and returns it whole."""
        pieces = []
        for piece in self.stream(instruction, input):
            pieces.append(piece)
            if out is not None:
                out.write(piece)
                out.flush()
        if out is not None:
            out.write("\n")
        return "".join(pieces)


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


def launch_ui(responder: Responder, args) -> None:
    """A Gradio page with the generation controls; its values really reach ``generate``."""
    try:
        import gradio as gr
    except ImportError:
        raise InputError("--ui needs gradio: pip install 'peft_bayes[ui]'") from None

    def answer(instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens):
        kw = {"num_beams": int(num_beams), "max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0}
        if temperature > 0:
            kw.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        text = ""
        for piece in responder.stream(instruction, input or None, **kw):
            text += piece
            yield text

    gr.Interface(
        fn=answer,
        inputs=[
            gr.Textbox(lines=2, label="Instruction"),
            gr.Textbox(lines=2, label="Input (optional)"),
            gr.Slider(0, 2, value=args.temperature, label="Temperature (0 = greedy)"),
            gr.Slider(0.01, 1, value=args.top_p, label="Top p"),
            gr.Slider(0, 100, step=1, value=args.top_k, label="Top k"),
            gr.Slider(1, 8, step=1, value=args.num_beams, label="Beams"),
            gr.Slider(1, 2048, step=1, value=args.max_new_tokens, label="Max new tokens"),
        ],
        outputs=gr.Textbox(lines=8, label="Response"),
        title="peft_bayes",
    ).queue().launch(server_name=args.server_name, server_port=args.server_port, share=args.share)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_progress_bars_off_terminal()
    note = apply_recorded_settings(args, {"prompt_template": "alpaca"})
    gen_kwargs = generation_kwargs(args)
    check_base_model(args.base_model, args.trust_remote_code)
    if args.ui and importlib.util.find_spec("gradio") is None:  # fail before minutes of model loading
        raise InputError("--ui needs gradio: pip install 'peft_bayes[ui]'")
    prompter = load_prompter(
        args.prompt_template, tokenizer_source(args.base_model, args.adapter), args.trust_remote_code
    )  # chat: tokenizer
    model, tokenizer = evaluate.load_eval_model(args)  # the same loading and checks as evaluate.py
    if note:  # every check passed: the template taken from the adapter, in one line
        print(note, file=sys.stderr)
    responder = Responder(model, tokenizer, prompter, gen_kwargs, seed=args.seed)
    if args.instruction is not None:
        responder.respond(args.instruction, args.input, out=sys.stdout)
    elif args.ui:
        launch_ui(responder, args)
    else:
        repl(responder)
    return 0
