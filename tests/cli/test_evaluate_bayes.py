"""evaluate.py's Bayesian evaluation: option-likelihood scoring of multiple-choice sets, averaging over posterior
samples, majority votes over sampled generations, calibration metrics and OOD detection."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.evaluate import generate_batched, load_eval_model
from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.synthetic import make_choice_problems, write_choice_data
from peft_bayes.errors import InputError
from peft_bayes.evaluation import predictive as bayes_eval
from peft_bayes.evaluation.choice_scoring import label_pairs, option_sequences, score_options, split_continuation
from peft_bayes.evaluation.predictive import averaged_option_probs, averaged_pair_probs, sample_seed
from peft_bayes.evaluation.votes import majority_vote, vote_metrics
from peft_bayes.metrics import auroc, confidence_calibration_error
from peft_bayes.models import load_tokenizer
from peft_bayes.posterior import BayesLoraPosterior
from peft_bayes.tiny import TINY_ARCHITECTURES
from peft_bayes.tuners.bayeslora import BayesLoraConfig, fresh_draws, posterior_sample

PREFIX = "the correct answer is "


def _choice_examples(n: int = 6, seed: int = 3):
    """Prompts with 2 to 5 options each (like ARC's 3-5), so rows of one batch have different option counts."""
    records = [make_choice_problems(1, seed=seed + i, n_options=2 + i % 4)[0] for i in range(n)]
    prompts = [f"### Instruction:\n{r['instruction']}\n\n### Response:\n" for r in records]
    options = [tuple(f"answer{k}" for k in range(1, 3 + i % 4)) for i in range(n)]
    return prompts, options


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder, padding_side="left")


@pytest.fixture(scope="module")
def bayes_model(llama_dir):
    """Tiny llama + BayesLoRA with random B and a wide posterior, so posterior samples really differ."""
    from peft import get_peft_model

    model, tok = _load(llama_dir)
    config = BayesLoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_std=0.5)
    config.init_lora_weights = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, config).eval(), tok


@pytest.fixture(scope="module")
def choice_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("choice")
    train, test = write_choice_data(str(root / "arith"), n_train=16, n_test=8, seed=0)
    _, ood = write_choice_data(str(root / "compare"), n_train=1, n_test=8, seed=0, kind="compare")
    return {"train": train, "test": test, "ood": ood}


def _eval(base, out, *extra) -> tuple[dict, list[dict]]:
    argv = ["--base_model", str(base), "--output_dir", str(out), "--quiet", "--batch_size", "3", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary,) = out.glob("*_summary.json")
    rows = summary.with_name(summary.name.replace("_summary", "_predictions"))
    return json.loads(summary.read_text()), json.loads(rows.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Option scoring
# ---------------------------------------------------------------------------------------------------------------


def test_continuation_split_with_and_without_prefix(llama_dir):
    tok = load_tokenizer(llama_dir)
    prompt = "### Instruction:\nPick one.\n\n### Response:\n"
    ((ids, n),) = option_sequences(tok, prompt, ["answer2"], PREFIX)
    assert tok.decode(ids[-n:]) == " answer2"  # the space before the label belongs to the option
    assert ids == tok(prompt + PREFIX + "answer2")["input_ids"]  # tokenized as in training
    assert tok.decode(ids[:-n], skip_special_tokens=True) == prompt + PREFIX.rstrip()
    ((ids, n),) = option_sequences(tok, prompt, ["answer2"], "")
    assert tok.decode(ids[-n:]) == "answer2" and ids == tok(prompt + "answer2")["input_ids"]


class MergingTokenizer:
    """Characters as tokens, BOS = 0, except that "sa" merges into one token: a context ending in "s" followed
    by a continuation starting with "a" does not tokenize as a prefix of the whole."""

    def __call__(self, text, add_special_tokens=True):
        ids = [0] if add_special_tokens else []
        i = 0
        while i < len(text):
            if text[i : i + 2] == "sa":
                ids.append(999)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_continuation_split_falls_back_when_context_is_no_prefix():
    tok = MergingTokenizer()
    assert split_continuation(tok, "is", " ab") == ([0, ord("i"), ord("s")], [ord(" "), ord("a"), ord("b")])
    # "is" + "ab" tokenizes as i, sa, b: the context is not a prefix, so the label is tokenized on its own.
    assert split_continuation(tok, "is", "ab") == ([0, ord("i"), ord("s")], [ord("a"), ord("b")])


def _manual_log_likelihoods(model, tok, prompt, options, prefix):
    """Independent reference: one option at a time, full-sequence float64 log-softmax, no padding."""
    context = prompt + prefix.rstrip()
    out = []
    for label in options:
        ids = tok(context + " " + label)["input_ids"]
        n_ctx = len(tok(context)["input_ids"])
        assert ids[:n_ctx] == tok(context)["input_ids"]  # the reference's split is the one expected
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))))
    return torch.tensor(out, dtype=torch.float64)


def test_option_scores_equal_independent_computation(bayes_model):
    model, tok = bayes_model
    prompts, options = _choice_examples()
    scores = score_options(model, tok, prompts, options, PREFIX, batch_size=4)
    for prompt, opts, got in zip(prompts, options, scores):
        expected = _manual_log_likelihoods(model, tok, prompt, opts, PREFIX)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert len({round(float(s[0]), 3) for s in scores}) > 1  # scores depend on the prompt


def _peft(model, name):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    configs = {
        "lora": LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
        "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, configs[name]).eval()


@pytest.mark.parametrize(
    ("arch", "adapter"),
    [(a, None) for a in TINY_ARCHITECTURES]
    + [("llama", "lora"), ("llama", "prefix-tuning"), ("gpt2", "prompt-tuning")],
)
def test_batched_option_scores_equal_one_at_a_time(arch, adapter, model_dirs):
    model, tok = _load(model_dirs[arch])
    if adapter:
        model = _peft(model, adapter)
    prompts, options = _choice_examples()
    single = score_options(model, tok, prompts, options, PREFIX, batch_size=1)
    batched = score_options(model, tok, prompts, options, PREFIX, batch_size=len(prompts))
    for a, b in zip(single, batched):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_probabilities_are_averaged_over_posterior_samples(bayes_model):
    model, tok = bayes_model
    prompts, options = _choice_examples(4)
    pairs = [label_pairs(p, opts, PREFIX) for p, opts in zip(prompts, options)]
    posterior = BayesLoraPosterior(model, draw="pass")  # one weight sample per pass: batch-independent
    got = averaged_pair_probs(model, tok, pairs, 3, samples=3, seed=7, posterior=posterior)
    per_sample = []
    for s in range(3):  # the same draws by hand, one example at a time
        with posterior_sample(model, seed=sample_seed(7, s)):
            per_sample.append([ll.softmax(-1) for ll in score_options(model, tok, prompts, options, PREFIX, 1)])
    assert not torch.allclose(per_sample[0][0], per_sample[1][0], atol=1e-3)  # the samples really differ
    for i in range(len(prompts)):
        expected = sum(p[i] for p in per_sample) / 3
        torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-6)
        from_logits = torch.stack([p[i].log() for p in per_sample]).mean(0).softmax(-1)
        assert (got[i] - from_logits).abs().max() > 1e-4  # averaging log-probabilities would give another answer
    # the default, BLoB's draws: a fresh E and flipout signs on every forward, seeded per sample (same batches)
    forward = averaged_option_probs(model, tok, prompts, options, PREFIX, batch_size=3, samples=3, seed=7)
    by_hand = []
    for s in range(3):
        with fresh_draws(model, seed=sample_seed(7, s)):
            by_hand.append([ll.softmax(-1) for ll in score_options(model, tok, prompts, options, PREFIX, 3)])
    for i in range(len(prompts)):
        torch.testing.assert_close(forward[i], sum(p[i] for p in by_hand) / 3, rtol=0, atol=1e-12)
        assert (forward[i] - got[i]).abs().max() > 1e-4  # not the fixed-weight samples
    # samples = 0: the posterior mean, which is also what eval mode gives by default.
    mean = averaged_option_probs(model, tok, prompts, options, PREFIX, batch_size=3, samples=0, seed=7)
    plain = [ll.softmax(-1) for ll in score_options(model, tok, prompts, options, PREFIX, 3)]
    for a, b in zip(mean, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Votes and their calibration
# ---------------------------------------------------------------------------------------------------------------


def test_majority_vote():
    assert majority_vote(["7", "8", "7", None]) == ("7", 0.5)
    assert majority_vote(["8", "7", "7", "8"]) == ("8", 0.5)  # tie: the answer seen first
    assert majority_vote([None, "7", None]) == (None, pytest.approx(2 / 3))  # "no answer" wins, never correct
    assert majority_vote(["1", "2", "3", "4", "5"]) == ("1", 0.2)  # a share below 1/2
    assert majority_vote(["3"]) == ("3", 1.0)


def test_vote_metrics():
    conf = [1.0, 0.2, 0.6, 0.6, 0.4]
    correct = [True, False, True, False, False]
    m = vote_metrics(conf, correct)
    assert m["accuracy_percent"] == 40.0
    # bins of width 1/15: {1.0: 1/1}, {0.2: 0/1}, {0.6: 1/2}, {0.4: 0/1}
    assert m["ece_percent"] == pytest.approx(100 * (0 + 0.2 + 2 * 0.1 + 0.4) / 5)
    assert m["ece_percent"] == pytest.approx(100 * confidence_calibration_error(conf, correct))
    assert m["auroc"] == pytest.approx(auroc(conf, correct)) and m["auroc"] == pytest.approx(5.5 / 6)
    m = vote_metrics([1.0, 1.0], [True, True])
    assert m["auroc"] is None and "all answers correct" in m["auroc_note"] and m["ece_percent"] == 0.0


def test_sampled_math_generations_are_voted(bayes_model, llama_dir, tmp_path, data_file):
    adapter = tmp_path / "bayes"
    bayes_model[0].save_pretrained(adapter)
    summary, rows = _eval(
        llama_dir,
        tmp_path / "out",
        "--adapter",
        adapter,
        "--data_path",
        data_file,
        "--limit",
        4,
        "--samples",
        3,
        "--seed",
        5,
        "--max_new_tokens",
        4,
    )
    assert summary["scoring"] == "generation-vote" and summary["samples"] == 3 and summary["seed"] == 5
    assert {"accuracy_percent", "ece_percent", "auroc"} <= set(summary)
    model, tok = load_eval_model(argparse.Namespace(**_args(llama_dir, adapter)))
    prompts = [r["prompt"] for r in rows]
    for s in range(3):  # each sample's generations are those of that posterior draw
        with posterior_sample(model, seed=sample_seed(5, s)):
            gens = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=4)
        assert [r["generations"][s] for r in rows] == [g.strip() for g in gens]
    for r in rows:
        answer, share = majority_vote([None if v == "no answer" else v for v in r["votes"]])
        assert (r["extracted"], r["confidence"]) == (answer, share)


def _args(base, adapter):
    return {
        "base_model": str(base),
        "adapter": str(adapter),
        "adapter_name": None,
        "trust_remote_code": False,
        "load_8bit": False,
        "load_4bit": False,
    }


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py end to end
# ---------------------------------------------------------------------------------------------------------------


def test_choice_evaluation_with_lora(llama_dir, choice_data, tmp_path, train_argv):
    adapter = tmp_path / "lora"
    assert train_main(train_argv(llama_dir, choice_data["train"], adapter)) == 0
    summary, rows = _eval(llama_dir, tmp_path / "out", "--adapter", adapter, "--data_path", choice_data["test"])
    assert summary["scoring"] == "option-likelihood" and summary["samples"] == 0
    assert summary["choice_prefix"] == PREFIX and summary["n"] == len(rows) == 8
    for key in ("accuracy_percent", "ece_percent", "nll_nats", "brier_sum_over_classes"):
        assert isinstance(summary[key], float), key
    assert summary["accuracy_percent"] == pytest.approx(100 * sum(r["correct"] for r in rows) / 8)
    gold = [int(r["gold"][-1]) - 1 for r in rows]
    # From the written probabilities, in float64 as the library computes it (they are float64 values written as
    # JSON floats, which round-trip exactly): only the summation order differs, a few ulps at most, and the summary
    # cuts floats to 12 significant digits (evaluate.rounded), a relative change of up to 5e-12.
    picked = torch.tensor([r["probs"][g] for r, g in zip(rows, gold)], dtype=torch.float64)
    assert summary["nll_nats"] == pytest.approx(-picked.log().mean().item(), rel=1e-11, abs=1e-15)
    for r in rows:
        assert r["options"] == ["answer1", "answer2", "answer3", "answer4"] and sum(r["probs"]) == pytest.approx(1)
        assert r["prediction"] == r["options"][max(range(4), key=r["probs"].__getitem__)]
        assert r["correct"] == (r["prediction"] == r["gold"])
    png = tmp_path / "out" / "test_reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["reliability_diagram"] == str(png)


def test_choice_evaluation_with_trained_bayeslora(llama_dir, choice_data, tmp_path, train_argv):
    adapter = tmp_path / "bayes"
    argv = train_argv(llama_dir, choice_data["train"], adapter, "--adapter_name", "bayeslora", "--bayes_eps", 0.5)
    assert train_main(argv) == 0
    flags = ["--adapter", adapter, "--data_path", choice_data["test"], "--limit", 4]
    summary, rows = _eval(llama_dir, tmp_path / "default", *flags)
    assert summary["samples"] == 10  # the default for an adapter with a posterior
    summary0, rows0 = _eval(llama_dir, tmp_path / "mean", *flags, "--samples", 0)
    assert summary0["samples"] == 0 and [r["probs"] for r in rows0] != [r["probs"] for r in rows]
    assert summary["bayes_eval_draw"] == "forward"
    # --bayes_eval_draw pass: one weight sample per pass, so the draws do not depend on the batching
    summary, rows = _eval(llama_dir, tmp_path / "pass", *flags, "--bayes_eval_draw", "pass")
    again, rows_again = _eval(llama_dir, tmp_path / "again", *flags, "--batch_size", 1, "--bayes_eval_draw", "pass")
    # seeded, batch-independent draws: equal up to float32 rounding, which depends on the batch's padding (the draws
    # themselves differ by ~1e-2 between samples, as the N = 0 comparison above shows)
    for a, b in zip(rows_again, rows, strict=True):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)


def test_ood_auroc_from_predictive_entropy(llama_dir, choice_data, tmp_path):
    summary, rows = _eval(
        llama_dir,
        tmp_path / "out",
        "--data_path",
        choice_data["test"],
        "--ood_data_path",
        choice_data["ood"],
        "--limit",
        6,
    )
    ood_rows = json.loads((tmp_path / "out" / "test_ood_test_predictions.json").read_text())
    assert summary["ood_n"] == len(ood_rows) == 6 and summary["ood_data_path"] == choice_data["ood"]

    def entropy(r):
        p = torch.tensor(r["probs"], dtype=torch.float64)
        return -(p * p.log()).sum().item()

    expected = auroc([entropy(r) for r in rows + ood_rows], [False] * 6 + [True] * 6)
    assert summary["ood_auroc"] == pytest.approx(expected, abs=1e-6)


def test_ood_needs_multiple_choice_sets(llama_dir, choice_data, data_file, tmp_path):
    with pytest.raises(InputError, match="--ood_dataset needs multiple-choice"):
        evaluate_main(["--base_model", llama_dir, "--data_path", data_file, "--ood_data_path", choice_data["ood"]])


def test_samples_on_deterministic_adapter_is_one_line_error(llama_dir, choice_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_summary.json").write_text("earlier run")
    argv = ["--base_model", llama_dir, "--data_path", choice_data["test"], "--output_dir", str(out), "--samples", "4"]
    assert run_cli(evaluate_main, argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --samples 4 needs an adapter with a posterior (bayeslora); this one is deterministic: "
        "use --samples 0\n"
    )  # before the model is loaded: no loading progress bars either
    assert [p.name for p in out.iterdir()] == ["test_summary.json"]
    assert (out / "test_summary.json").read_text() == "earlier run"
    # A deterministic adapter that only reveals itself once loaded gets the same message.
    model, _ = _load(llama_dir)
    with pytest.raises(InputError, match="^--samples 4 needs an adapter with a posterior"):
        bayes_eval.resolve_samples(4, _peft(model, "lora"))


def test_gold_not_among_options(llama_dir, tmp_path):
    records = make_choice_problems(3, seed=1, n_options=3)
    records[2]["answer"] = "answer4"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"record 2 has answer 'answer4', which is not one of its options"):
        evaluate_main(["--base_model", llama_dir, "--data_path", str(path), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_default_samples_is_zero_without_posterior(llama_dir):
    model, _ = _load(llama_dir)
    assert bayes_eval.resolve_samples(None, model) == 0 and bayes_eval.resolve_samples(0, model) == 0


def test_mixed_option_counts_and_bare_labels_end_to_end(llama_dir, tmp_path):
    records = [make_choice_problems(1, seed=i, n_options=3 + i % 3)[0] for i in range(6)]  # 3, 4, 5 options
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    summary, rows = _eval(llama_dir, tmp_path / "out", "--data_path", path, "--choice_prefix", "")
    assert [len(r["options"]) for r in rows] == [3, 4, 5, 3, 4, 5] and summary["choice_prefix"] == ""
    # The written probabilities are the option softmax of the bare labels after the prompt.
    from peft_bayes.data import Prompter

    model, tok = _load(llama_dir)
    prompts = [Prompter.from_name("alpaca").generate_prompt(r["instruction"]) for r in records]
    scores = score_options(model, tok, prompts, [r["options"] for r in rows], prefix="", batch_size=1)
    for row, s in zip(rows, scores):
        torch.testing.assert_close(torch.tensor(row["probs"], dtype=torch.float64), s.softmax(-1), rtol=0, atol=1e-6)
    # Metrics over rows of different widths: zero-padded probabilities, the gold index within each row.
    gold = [r["options"].index(r["gold"]) for r in rows]
    brier = sum(sum((p - (k == g)) ** 2 for k, p in enumerate(r["probs"])) for r, g in zip(rows, gold)) / 6
    assert summary["brier_sum_over_classes"] == pytest.approx(brier, abs=1e-9)


@pytest.mark.parametrize(
    ("value", "message"), [("abc", "argument --samples: expected a number"), ("-1", "--samples must")]
)
def test_bad_samples_flag(value, message, llama_dir, choice_data, capsys):
    argv = ["--base_model", llama_dir, "--data_path", choice_data["test"], "--samples", value]
    try:
        status = run_cli(evaluate_main, argv)
    except SystemExit as exit_:  # argparse rejects a malformed flag value itself
        status = exit_.code
    assert status == 2 and message in capsys.readouterr().err
