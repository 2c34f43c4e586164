"""generate.py --ui: a Gradio page that streams the response, then shows how sure the posterior is of it.

The uncertainty appears under the response once the N draws have run: the answer's tokens highlighted by their
mutual information (the epistemic part), the answers sampled one per draw with their vote share, and the summary
line; a slider sets N.
"""

from __future__ import annotations

from peft_bayes.errors import InputError
from peft_bayes.evaluation.uncertainty import AnswerUncertainty

SUMMARY_ID, TOKENS_ID, SAMPLES_ID, STATUS_ID = "uncertainty-summary", "token-uncertainty", "sampled-answers", "status"


def highlighted(result: AnswerUncertainty) -> list[tuple[str, float | None]]:
    """(token, score) pairs for Gradio's HighlightedText: each token's mutual information over the answer's
    largest (0..1; None leaves a token plain), or its predictive entropy for a point estimate."""
    key = "mutual_information" if result.draws > 1 else "predictive_entropy"
    values = result.per_token[key]
    top = max(values, default=0.0)
    return [(t, (v / top if top > 0 and v > 0 else None)) for t, v in zip(result.tokens, values)]


def summary_markdown(result: AnswerUncertainty) -> str:
    marked = ", ".join(repr(result.tokens[i]) for i in result.marked) or "none"
    return f"**{result.verdict}** · {result.summary_line().split(' · ', 1)[1]}  \nmost uncertain tokens: {marked}"


def samples_markdown(result: AnswerUncertainty) -> str:
    if result.agreement is None:
        return "*a point estimate: no sampled answers*"
    n = result.agreement["n"]
    rows = [f"| {g['answer'] or '(empty)'} | {g['votes']}/{n} | {100 * g['share']:.0f} % |"
            for g in result.agreement["groups"]]  # fmt: skip
    return "\n".join([f"{n} answers, one per posterior draw:", "", "| answer | votes | share |", "|---|---:|---:|",
                      *rows])  # fmt: skip


def _generation(temperature, top_p, top_k, num_beams, max_new_tokens) -> dict:
    kw = {"num_beams": int(num_beams), "max_new_tokens": int(max_new_tokens), "do_sample": temperature > 0}
    if temperature > 0:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    return kw


def build_page(responder, args):
    """The Gradio ``Blocks`` of generate.py --ui (not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise InputError("--ui needs gradio: pip install 'peft_bayes[ui]'") from None
    analyzer = responder.analyzer

    def answer(instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens, samples):
        text = ""
        for piece in responder.stream(instruction, input or None, **_generation(temperature, top_p, top_k, num_beams,
                                                                                 max_new_tokens)):  # fmt: skip
            text += piece
            yield text, None, "", "", "generating…"
        if analyzer is None:
            yield text, None, "", "", ""
            return
        n = analyzer.set_samples(int(samples)) if analyzer.posterior.stochastic else 0
        yield text, None, "", "", f"running {max(n, 1)} posterior draw(s)…"
        result = responder.uncertainty()
        yield text, highlighted(result), summary_markdown(result), samples_markdown(result), "done"

    with gr.Blocks(title="peft_bayes") as page:
        gr.Markdown("# peft_bayes" + (f" · posterior: {analyzer.posterior.name}" if analyzer else ""))
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(lines=2, label="Instruction")
                input = gr.Textbox(lines=2, label="Input (optional)")
                temperature = gr.Slider(0, 2, value=args.temperature, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.01, 1, value=args.top_p, label="Top p")
                top_k = gr.Slider(0, 100, step=1, value=args.top_k, label="Top k")
                beams = gr.Slider(1, 8, step=1, value=args.num_beams, label="Beams")
                max_new = gr.Slider(1, 2048, step=1, value=args.max_new_tokens, label="Max new tokens")
                n = analyzer.samples if analyzer else 0
                samples = gr.Slider(1, 32, step=1, value=max(n, 1), label="Posterior draws N", visible=n > 0)
                submit = gr.Button("Submit", variant="primary")
            with gr.Column():
                response = gr.Textbox(lines=8, label="Response")
                status = gr.Markdown(elem_id=STATUS_ID)
                # Gradio's numeric legend reads -1..+1; the scores are 0..1 (MI over the answer's largest), so the
                # label says what the colour means instead
                label = "Tokens by epistemic uncertainty: the redder, the larger its mutual information"
                tokens = gr.HighlightedText(label=label, elem_id=TOKENS_ID, combine_adjacent=False, show_legend=False)
                summary = gr.Markdown(elem_id=SUMMARY_ID)
                sampled = gr.Markdown(elem_id=SAMPLES_ID)
        inputs = [instruction, input, temperature, top_p, top_k, beams, max_new, samples]
        submit.click(answer, inputs, [response, tokens, summary, sampled, status])
    return page


def launch_ui(responder, args) -> None:
    """Serves the page (blocks until stopped)."""
    build_page(responder, args).queue().launch(server_name=args.server_name, server_port=args.server_port,
                                               share=args.share)  # fmt: skip
