"""The shared option-scoring paths (packed rows, or the prompt once per example and the options from its KV cache)
against the full path (every option its own sequence) and against an independent per-option computation, in the
label and cloze formats, on every tiny architecture; evaluate.py and train.py with --choice_format cloze."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.data.choices import parse_choice_question
from peft_bayes.errors import InputError
from peft_bayes.evaluation.choice_scoring import (
    cloze_pairs,
    encode_pairs,
    label_pairs,
    score_pairs,
    sequence_log_likelihoods,
)
from peft_bayes.evaluation.packed_scoring import (
    common_prefix,
    pack_example,
    packed_attention_mask,
    packed_log_likelihoods,
    packing_is_exact,
    shared_length,
)
from peft_bayes.models import load_tokenizer
from peft_bayes.tiny import TINY_ARCHITECTURES
from peft_bayes.tuners.bayeslora import BayesLoraConfig, posterior_sample

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "llm-adapters"
PROMPT = "### Instruction:\n{}\n\n### Response:\n"
# One question in every option format of LLM-Adapters' commonsense sets, with 2-5 options of different lengths.
QUESTIONS = [
    "Please choose the correct answer to the question: How many legs has a cat?\n\nAnswer1: four legs Answer2: two "
    "Answer3: three small ones Answer4: none at all\n\nAnswer format: answer1/answer2/answer3/answer4",
    "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false",
    "Please choose the correct solution to the question: To cut bread,\n\nSolution1: use a knife.\n\nSolution2: use "
    "a spoon and wait.\n\nAnswer format: solution1/solution2",
    "Please choose the correct answer to fill in the blank to complete the given sentence: Tom gave Bob a gift "
    "because _ was kind.\n\nOption1: Tom Option2: Bob Answer format: option1/option2",
    "Please choose the correct ending to complete the given sentence: Cooking: He cuts the onion\n\nEnding1: and "
    "cries. Ending2: and flies away home. Ending3: then sings. Ending4: slowly.\n\nAnswer format: "
    "ending1/ending2/ending3/ending4",
    "Please choose the correct answer to the question: Which is largest?\n\nAnswer1: 12 Answer2: 7 Answer3: 130 "
    "Answer4: 9 Answer5: 1000\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
]


def _label_pairs(prefix="the correct answer is "):
    return [label_pairs(PROMPT.format(q), parse_choice_question({"instruction": q}).labels, prefix) for q in QUESTIONS]


def _cloze_pairs():
    out = []
    for q in QUESTIONS:
        question = parse_choice_question({"instruction": q})
        out.append(cloze_pairs(PROMPT.format(question.stem), question))
    return out


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder, padding_side="left")


def _independent(model, tok, pairs):
    """One option at a time, unpadded, float64 log-softmax over the whole sequence: sum over the continuation."""
    out = []
    for context, continuation in pairs:
        n_ctx = len(tok(context)["input_ids"])
        ids = tok(context + continuation)["input_ids"]
        assert len(ids) > n_ctx
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))))
    return torch.tensor(out, dtype=torch.float64)


def _assert_same_probs(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.softmax(-1), y.softmax(-1), rtol=0, atol=atol)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("fmt", ["label", "bare-label", "cloze"])
def test_shared_equals_full_on_every_architecture(arch, fmt, model_dirs):
    model, tok = _load(model_dirs[arch])
    pairs = {"label": _label_pairs(), "bare-label": _label_pairs(""), "cloze": _cloze_pairs()}[fmt]
    full = score_pairs(model, tok, pairs, batch_size=4, scoring="full")
    shared = score_pairs(model, tok, pairs, batch_size=4, scoring="shared")
    one_by_one = score_pairs(model, tok, pairs, batch_size=1, scoring="shared")
    _assert_same_probs(shared, full)
    _assert_same_probs(one_by_one, full)
    # the options really differ (a test of equal scores is no test when every score is the same)
    assert all(float(s.max() - s.min()) > 1e-3 for s in full)


# ---------------------------------------------------------------------------------------------------------------
# The packed path (one row per example) and the KV-cache path, each against the full path
# ---------------------------------------------------------------------------------------------------------------

PACKED_ARCHITECTURES = tuple(a for a in TINY_ARCHITECTURES if a != "bloom")  # BLOOM: ALiBi from the 2D mask


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_packing_is_taken_where_it_is_exact(arch, model_dirs):
    model, _ = _load(model_dirs[arch])
    assert packing_is_exact(model) == (arch in PACKED_ARCHITECTURES)


@pytest.mark.parametrize("common", ["cached", "in-rows"])
@pytest.mark.parametrize("arch", PACKED_ARCHITECTURES)
@pytest.mark.parametrize("fmt", ["label", "bare-label", "cloze"])
def test_packed_equals_full_on_every_architecture(arch, fmt, common, model_dirs):
    """All six questions in ONE packed batch: prefixes of different lengths padded, 2-5 options of 1-6 tokens; the
    template's start that every question shares run once from its KV cache, or inside every row."""
    model, tok = _load(model_dirs[arch])
    pairs = {"label": _label_pairs(), "bare-label": _label_pairs(""), "cloze": _cloze_pairs()}[fmt]
    encoded = [encode_pairs(tok, p) for p in pairs]
    min_common = {"cached": 0, "in-rows": 10**9}[common]
    split, _ = common_prefix([pack_example(e) for e in encoded], min_common)
    assert len(split) > 3 if common == "cached" else not split  # "### Instruction:" and more
    packed = packed_log_likelihoods(model, encoded, tok.pad_token_id, min_common=min_common)
    _assert_same_probs(packed, score_pairs(model, tok, pairs, batch_size=6, scoring="full"))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("fmt", ["label", "bare-label", "cloze"])
def test_cached_equals_full_on_every_architecture(arch, fmt, model_dirs):
    model, tok = _load(model_dirs[arch])
    pairs = {"label": _label_pairs(), "bare-label": _label_pairs(""), "cloze": _cloze_pairs()}[fmt]
    cached = score_pairs(model, tok, pairs, batch_size=4, scoring="cached")
    _assert_same_probs(cached, score_pairs(model, tok, pairs, batch_size=4, scoring="full"))


def test_pack_example_lays_out_prefix_then_options_at_their_own_positions():
    # shared prefix [1, 2, 3]; option 0 scores 4 5 6, option 1 scores 7, option 2 scores 8 9
    row = pack_example([([1, 2, 3, 4, 5, 6], 3), ([1, 2, 3, 7], 1), ([1, 2, 3, 8, 9], 2)])
    assert row.ids == [1, 2, 3, 4, 5, 8]  # each option's last token is only predicted, never fed
    assert row.positions == [0, 1, 2, 3, 4, 3]
    assert row.segments == [0, 0, 0, 1, 1, 3]
    assert row.scored == [(2, 4, 0), (3, 5, 0), (4, 6, 0), (2, 7, 1), (2, 8, 2), (5, 9, 2)]
    segments = torch.tensor([row.segments + [-1]])
    mask = packed_attention_mask(segments, segments >= 0, torch.float32)[0, 0] == 0  # True: attends
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],  # option 0: the prefix and itself
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],  # option 2: the prefix and itself, never option 0
            [1, 1, 1, 0, 0, 0, 1],  # padding: nothing real reads it
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("arch", PACKED_ARCHITECTURES)
def test_packed_pads_examples_and_takes_options_that_share_no_tokens(arch, model_dirs):
    model, _ = _load(model_dirs[arch])
    examples = [
        [([5, 6, 7, 8, 9], 2), ([10, 11, 12], 1)],  # no token shared: a row without prefix
        [([1, 2, 3, 4, 5, 6, 7, 8], 3), ([1, 2, 3, 4, 5, 6, 9], 2), ([1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13], 6)],
        [([1, 20], 1), ([1, 21], 1), ([1, 22, 23], 2)],  # short prefix beside the long one: padded
    ]
    assert [shared_length(ex) for ex in examples] == [0, 6, 1]
    batched = packed_log_likelihoods(model, examples, pad_id=0)
    for got, example in zip(batched, examples, strict=True):
        reference = sequence_log_likelihoods(model, example, pad_id=0)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed_log_likelihoods(model, [example], pad_id=0)[0], reference, rtol=0, atol=1e-5)
    assert float(batched[1].max() - batched[1].min()) > 1e-3


@pytest.mark.parametrize("arch", PACKED_ARCHITECTURES)
def test_packed_runs_the_common_start_once_up_to_the_first_scored_position(arch, model_dirs):
    model, _ = _load(model_dirs[arch])
    examples = [
        [([1, 2, 3, 4, 5, 6], 1), ([1, 2, 3, 4, 5, 7], 1)],  # scored from column 4: the common part stops before
        [([1, 2, 3, 4, 5, 8, 9, 10], 2), ([1, 2, 3, 4, 5, 8, 9, 11, 12], 3)],
        [([1, 2, 3, 4, 5, 30, 31, 32], 3), ([1, 2, 3, 4, 5, 30, 33], 1)],
    ]
    common, rows = common_prefix([pack_example(e) for e in examples], min_tokens=0)
    assert common == [1, 2, 3, 4] and rows[0].ids == [5] and rows[1].positions[0] == 4
    assert common_prefix([pack_example(e) for e in examples], min_tokens=9)[0] == []  # saves 2 * 4 tokens only
    got = packed_log_likelihoods(model, examples, pad_id=0, min_common=0)
    for scores, example in zip(got, examples, strict=True):
        torch.testing.assert_close(scores, sequence_log_likelihoods(model, example, pad_id=0), rtol=0, atol=1e-5)


class _Ignores(torch.nn.Module):
    """A model whose forward takes ``position_ids`` and a mask but drops one of them (what the probe must catch)."""

    def __init__(self, model, dropped: str):
        super().__init__()
        self.model, self.config, self.dropped = model, model.config, dropped

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        kwargs[self.dropped] = None
        kwargs.setdefault("attention_mask", attention_mask)
        kwargs.setdefault("position_ids", position_ids)
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("dropped", ["position_ids", "attention_mask"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packing_probe_rejects_a_model_that_drops_positions_or_the_mask(arch, dropped, model_dirs):
    model, tok = _load(model_dirs[arch])
    wrapped = _Ignores(model, dropped).eval()
    assert packing_is_exact(model) and not packing_is_exact(wrapped)
    pairs = _cloze_pairs()  # one example per batch: no padding hole that the dropped argument would expose
    shared = score_pairs(wrapped, tok, pairs, batch_size=1, scoring="shared")
    _assert_same_probs(shared, score_pairs(model, tok, pairs, scoring="full"))


def test_cloze_scores_equal_independent_computation(llama_dir):
    model, tok = _load(llama_dir)
    pairs = _cloze_pairs()
    for got, example in zip(score_pairs(model, tok, pairs, batch_size=3), pairs):
        torch.testing.assert_close(got, _independent(model, tok, example), rtol=0, atol=1e-4)


def test_winogrande_scores_only_the_rest_of_the_sentence(llama_dir):
    model, tok = _load(llama_dir)
    (pairs,) = [p for p in _cloze_pairs() if p[0][1] == " was kind."]
    assert [c for c, _ in pairs][0].endswith("Tom gave Bob a gift because Tom")
    torch.testing.assert_close(score_pairs(model, tok, [pairs])[0], _independent(model, tok, pairs), rtol=0, atol=1e-4)


def _adapted(llama_dir, kind):
    from peft import LoraConfig, get_peft_model

    model, tok = _load(llama_dir)
    if kind == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    else:
        config = BayesLoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_std=0.5)
        config.init_lora_weights = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, config).eval(), tok


@pytest.mark.parametrize("scoring", ["shared", "cached"])
@pytest.mark.parametrize("kind", ["lora", "bayeslora"])
def test_shared_equals_full_with_adapters_and_posterior_samples(kind, scoring, llama_dir):
    model, tok = _adapted(llama_dir, kind)
    pairs = _cloze_pairs() + _label_pairs()
    with posterior_sample(model, seed=3) if kind == "bayeslora" else torch.no_grad():
        full = score_pairs(model, tok, pairs, batch_size=5, scoring="full")
        shared = score_pairs(model, tok, pairs, batch_size=5, scoring=scoring)
    _assert_same_probs(shared, full)


def test_normalisation_per_token_and_per_character(llama_dir):
    model, tok = _load(llama_dir)
    pairs = _cloze_pairs()
    summed = score_pairs(model, tok, pairs, norm="none")
    per_token = score_pairs(model, tok, pairs, norm="tokens")
    per_char = score_pairs(model, tok, pairs, norm="chars")
    for s, t, c, example in zip(summed, per_token, per_char, pairs):
        n_tokens = [len(tok(ctx + cont)["input_ids"]) - len(tok(ctx)["input_ids"]) for ctx, cont in example]
        torch.testing.assert_close(t, s / torch.tensor(n_tokens, dtype=torch.float64), rtol=0, atol=1e-12)
        n_chars = torch.tensor([len(cont) for _, cont in example], dtype=torch.float64)
        torch.testing.assert_close(c, s / n_chars, rtol=0, atol=1e-12)


def test_bad_scoring_arguments(llama_dir):
    model, tok = _load(llama_dir)
    with pytest.raises(InputError, match="^scoring must be one of shared/cached/full, got 'fast'"):
        score_pairs(model, tok, _cloze_pairs(), scoring="fast")
    with pytest.raises(InputError, match="^norm must be one of none/tokens/chars, got 'bytes'"):
        score_pairs(model, tok, _cloze_pairs(), norm="bytes")


# ---------------------------------------------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def commonsense_file(tmp_path_factory):
    """The six questions above as a test set, each with a gold answer."""
    golds = ["answer1", "true", "solution1", "option2", "ending1", "answer5"]
    records = [
        {"instruction": q, "input": "", "output": f"the correct answer is {g}", "answer": g}
        for q, g in zip(QUESTIONS, golds)
    ]
    path = tmp_path_factory.mktemp("cs") / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def _evaluate(llama_dir, data, out, *extra):
    argv = ["--base_model", str(llama_dir), "--data_path", str(data), "--output_dir", str(out), "--quiet",
            "--batch_size", "4", "--prompt_template", "alpaca_short", *extra]  # fmt: skip
    assert evaluate_main(argv) == 0
    summary = json.loads((out / "mixed_summary.json").read_text())
    return summary, json.loads((out / "mixed_predictions.json").read_text())


def test_evaluate_cloze_shared_equals_full(llama_dir, commonsense_file, tmp_path):
    shared, rows = _evaluate(llama_dir, commonsense_file, tmp_path / "s", "--choice_format", "cloze")
    full, rows_full = _evaluate(
        llama_dir, commonsense_file, tmp_path / "f", "--choice_format", "cloze", "--choice_scoring", "full"
    )
    assert shared["choice_format"] == "cloze" and shared["choice_scoring"] == "shared" and shared["n"] == 6
    assert rows[0]["option_texts"] == ["four legs", "two", "three small ones", "none at all"]
    assert "Answer1" not in rows[0]["prompt"] and rows[0]["options"][0] == "answer1"
    for a, b in zip(rows, rows_full):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
    assert shared["nll_nats"] == pytest.approx(full["nll_nats"], abs=1e-4)


def test_evaluate_cloze_bad_record_is_one_line(llama_dir, tmp_path, capsys):
    from peft_bayes.cli.common import run_cli

    bad = tmp_path / "mixed.json"
    broken = QUESTIONS[0].replace("Answer2:", "Answer 2")
    bad.write_text(json.dumps([{"instruction": broken, "answer": "answer1", "output": ""}]))
    argv = ["--base_model", str(llama_dir), "--data_path", str(bad), "--choice_format", "cloze",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert run_cli(evaluate_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "record 0" in err and "answer2 not found" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_train_cloze_turns_records_into_option_texts(llama_dir, commonsense_file, tmp_path, train_argv):
    out = tmp_path / "adapter"
    assert (
        train_main(
            train_argv(
                llama_dir,
                commonsense_file,
                out,
                "--choice_format",
                "cloze",
                "--micro_batch_size",
                "2",
                "--batch_size",
                "2",
            )
        )
        == 0
    )
    assert (out / "adapter_model.safetensors").is_file()
    from peft_bayes.cli.train import build_parser, load_data

    args = build_parser().parse_args(train_argv(llama_dir, commonsense_file, out, "--choice_format", "cloze"))
    _, train, _ = load_data(args)
    outputs = {r["output"] for r in train}
    assert "four legs" in outputs and "true" in outputs and "use a knife." in outputs
    assert "Tom gave Bob a gift because Bob was kind." in outputs
    assert all("Answer format" not in r["instruction"] for r in train)


# ---------------------------------------------------------------------------------------------------------------
# The real model and its tokenizer (skipped without make install-real)
# ---------------------------------------------------------------------------------------------------------------

ARC_TEST = SHARED_DATA / "dataset" / "ARC-Easy" / "test.json"


@pytest.mark.skipif(not ARC_TEST.is_file(), reason=f"real data not found at {ARC_TEST} (CI has it under ../shared)")
@pytest.mark.parametrize("fmt", ["label", "cloze"])
def test_shared_equals_full_on_the_real_model(fmt, smollm2_cache):
    """SmolLM2-135M with its own tokenizer and chat template, on real ARC-Easy questions."""
    from peft_bayes.evaluation.datasets import load_eval_set
    from peft_bayes.models import load_prompter

    folder = smollm2_cache[1]
    model, tok = _load(folder)
    data = load_eval_set("ARC-Easy", str(ARC_TEST), 6, load_prompter("chat", folder), fmt)
    assert data.prompts[0].startswith("<|im_start|>") and data.prompts[0].endswith("<|im_start|>assistant\n")
    full = score_pairs(model, tok, data.pairs, batch_size=3, scoring="full")
    shared = score_pairs(model, tok, data.pairs, batch_size=3, scoring="shared")
    _assert_same_probs(shared, full)
    assert all(float(s.max() - s.min()) > 1e-3 for s in full)


@pytest.mark.skipif(not ARC_TEST.is_file(), reason=f"real data not found at {ARC_TEST} (CI has it under ../shared)")
def test_real_model_packs_and_its_cached_path_equals_full(smollm2_cache):
    from peft_bayes.evaluation.datasets import load_eval_set
    from peft_bayes.models import load_prompter

    folder = smollm2_cache[1]
    model, tok = _load(folder)
    assert packing_is_exact(model)
    data = load_eval_set("ARC-Easy", str(ARC_TEST), 3, load_prompter("chat", folder), "cloze")
    full = score_pairs(model, tok, data.pairs, batch_size=3, scoring="full")
    _assert_same_probs(score_pairs(model, tok, data.pairs, batch_size=3, scoring="cached"), full)


def _brute_force_cost(lengths, overhead):
    """Cheapest split of the sorted lengths into consecutive groups, by trying every set of cut points."""
    import itertools

    ordered = sorted(lengths, reverse=True)
    best = float("inf")
    for n_cuts in range(len(ordered)):
        for cuts in itertools.combinations(range(1, len(ordered)), n_cuts):
            bounds = [0, *cuts, len(ordered)]
            cost = sum((b - a) * ordered[a] + overhead for a, b in zip(bounds, bounds[1:]))
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_are_optimal_and_cover_every_row(seed):
    import random

    from peft_bayes.evaluation.choice_scoring import length_groups

    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 3, 5, 8, 20, 31]) for _ in range(rng.randint(1, 9))]
    overhead = rng.choice([0, 4, 24])
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
    assert cost == _brute_force_cost(lengths, overhead)
    assert length_groups([3, 3, 3], 0) in ([[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]])


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_shared_equals_full_when_every_option_is_its_own_group(arch, model_dirs, monkeypatch):
    import peft_bayes.evaluation.choice_scoring as cs

    monkeypatch.setattr(cs, "_GROUP_OVERHEAD_TOKENS", 0)  # no cost per group: one group per remainder length
    model, tok = _load(model_dirs[arch])
    pairs = _cloze_pairs()
    cached = score_pairs(model, tok, pairs, batch_size=6, scoring="cached")
    _assert_same_probs(cached, score_pairs(model, tok, pairs, scoring="full"))
