"""evaluate.py: batched generation is exact, results keep dataset order, flags and scoring do what they say."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_bayes.cli import evaluate
from peft_bayes.cli.evaluate import generate_batched
from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import main as train_main
from peft_bayes.errors import InputError
from peft_bayes.models import load_tokenizer
from peft_bayes.tiny import TINY_ARCHITECTURES

# Prompts of clearly different lengths, deliberately not sorted by length.
PROMPTS = [
    "### Instruction:\nTom has 3 apples. He buys 4 more apples. How many apples does Tom have now?\n\n### Response:\n",
    "Hi",
    "### Instruction:\nThere are 7 pencils in a basket. Anna puts 2 more pencils in the basket. How many pencils are "
    "in the basket now?\n\n### Response:\n",
    "The answer is 12",
    "### Instruction:\nLucy had 9 shells. She lost 4 shells.\n\n### Response:\n",
]


def _records(data_file) -> list[dict]:
    return json.loads(open(data_file, encoding="utf-8").read())


def _write(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def _run(base, out, *extra) -> tuple[dict, list[dict]]:
    """Runs evaluate.py in-process; returns (summary, prediction rows) of the one dataset it evaluated."""
    argv = ["--base_model", str(base), "--output_dir", str(out), "--max_new_tokens", "4", "--quiet", *map(str, extra)]
    assert evaluate_main(argv) == 0
    (summary_file,) = out.glob("*_summary.json")
    rows_file = summary_file.with_name(summary_file.name.replace("_summary", "_predictions"))
    return json.loads(summary_file.read_text()), json.loads(rows_file.read_text())


def _load(folder, padding_side="left"):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    return model, load_tokenizer(folder, padding_side=padding_side)


# ---------------------------------------------------------------------------------------------------------------
# (a) batching is exact: left padding + attention mask + KV cache give the unbatched greedy continuations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_batched_generation_equals_one_at_a_time(arch, model_dirs):
    model, tok = _load(model_dirs[arch])
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS), lengths  # every batch needs padding
    single = generate_batched(model, tok, PROMPTS, batch_size=1, max_new_tokens=6)
    assert len(set(single)) > 1, single  # the continuations depend on the prompt
    assert generate_batched(model, tok, PROMPTS, batch_size=5, max_new_tokens=6) == single


def test_batching_check_detects_bad_padding(llama_dir):
    """The comparison above is sensitive: right padding (the classic bug) changes the generations."""
    model, tok = _load(llama_dir, padding_side="right")
    single = generate_batched(model, tok, PROMPTS, batch_size=1, max_new_tokens=8)
    assert generate_batched(model, tok, PROMPTS, batch_size=5, max_new_tokens=8) != single


ADAPTER_CASES = [
    ("llama", "lora"),
    ("gpt2", "lora"),
    ("llama", "prefix-tuning"),
    ("gpt2", "prefix-tuning"),
    ("gpt2", "prompt-tuning"),  # batched within equal token lengths: PEFT ignores their position_ids
    ("gpt2", "p-tuning"),
]


def _peft_config(name: str):
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if name == "lora":  # random B: the adapter really changes the outputs
        return LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    if name == "prefix-tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if name == "prompt-tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)


@pytest.mark.parametrize(("arch", "adapter"), ADAPTER_CASES)
def test_batched_generation_with_adapter(arch, adapter, model_dirs):
    from peft import get_peft_model

    model, tok = _load(model_dirs[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(model, _peft_config(adapter)).eval()
    single = generate_batched(model, tok, PROMPTS, batch_size=1, max_new_tokens=8)
    assert generate_batched(model, tok, PROMPTS, batch_size=5, max_new_tokens=8) == single


# ---------------------------------------------------------------------------------------------------------------
# (b) longest prompts are generated first, results come back in input order
# ---------------------------------------------------------------------------------------------------------------


class EchoModel(torch.nn.Module):
    """``generate`` continues every row with its own last prompt tokens, and records the batches it is given."""

    def __init__(self, tokenizer, prompts):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate_batched reads the device off a parameter
        self.ids = [tokenizer(p)["input_ids"] for p in prompts]
        self.batches: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
        batch = []
        for row, mask in zip(input_ids, attention_mask):
            assert mask[-1] == 1, "left padding: every row ends with a real token"
            batch.append(self.ids.index(row[mask.bool()].tolist()))
        self.batches.append(batch)
        return torch.cat([input_ids, input_ids[:, -max_new_tokens:]], dim=1)


def test_results_in_input_order_although_batches_are_sorted(llama_dir):
    tok = load_tokenizer(llama_dir, padding_side="left")
    prompts = [f"{'word ' * n}ending{i}" for i, n in enumerate([3, 9, 1, 6, 12, 4, 7])]
    model = EchoModel(tok, prompts)
    progress = []
    outputs = generate_batched(
        model, tok, prompts, batch_size=3, max_new_tokens=2, progress=lambda *a: progress.append(a)
    )
    # Each output belongs to its own prompt: the echo of that prompt's last two tokens.
    assert outputs == [tok.decode(tok(p)["input_ids"][-2:]) for p in prompts]
    assert all(o.endswith(str(i)) for i, o in enumerate(outputs)), outputs
    # Batches were formed longest first.
    assert [len(b) for b in model.batches] == [3, 3, 1]
    order = [i for batch in model.batches for i in batch]
    assert order == sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    assert progress == [(3, 7), (6, 7), (7, 7)]


def test_predictions_in_dataset_order(llama_dir, data_file, tmp_path):
    records = _records(data_file)[:7]
    summary, rows = _run(llama_dir, tmp_path, "--data_path", data_file, "--limit", 7, "--batch_size", 3)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in records]
    assert [r["gold"] for r in rows] == [r["answer"] for r in records]
    assert all(r["instruction"] in row["prompt"] for r, row in zip(records, rows))
    # Same generations as one-at-a-time: batch composition does not leak into the rows.
    _, rows1 = _run(llama_dir, tmp_path / "bs1", "--data_path", data_file, "--limit", 7, "--batch_size", 1)
    assert [r["generation"] for r in rows1] == [r["generation"] for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# (c) --limit
# ---------------------------------------------------------------------------------------------------------------


def test_limit(llama_dir, data_file, tmp_path):
    records = _records(data_file)
    summary, rows = _run(llama_dir, tmp_path / "3", "--data_path", data_file, "--limit", 3, "--batch_size", 8)
    assert summary["n"] == len(rows) == 3
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in records[:3]]
    # A limit beyond the data evaluates everything.
    summary, rows = _run(llama_dir, tmp_path / "all", "--data_path", data_file, "--limit", 1000, "--batch_size", 32)
    assert summary["n"] == len(rows) == len(records)


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_nonpositive_limit_is_an_input_error(limit, llama_dir, data_file, tmp_path):
    argv = ["--base_model", llama_dir, "--data_path", data_file, "--dataset", "SVAMP", "--limit", limit]
    with pytest.raises(InputError):
        evaluate_main([*argv, "--max_new_tokens", "1", "--output_dir", str(tmp_path), "--quiet"])
    assert not (tmp_path / "SVAMP_summary.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# (d) --dataset NAME --data_dir DIR
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_and_data_dir(llama_dir, data_file, tmp_path, monkeypatch):
    records = _records(data_file)[:5]
    data_dir = tmp_path / "dataset"
    test_json = _write(data_dir / "arith" / "test.json", records)
    summary, rows = _run(llama_dir, tmp_path / "out", "--dataset", "arith", "--data_dir", data_dir)
    assert summary["dataset"] == "arith" and summary["data_path"] == test_json and summary["n"] == 5
    assert (tmp_path / "out" / "arith_predictions.json").is_file()
    assert [r["gold"] for r in rows] == [r["answer"] for r in records]

    # The data folder can come from the environment instead.
    monkeypatch.setenv("PEFT_BAYES_DATA_DIR", str(data_dir))
    summary, _ = _run(llama_dir, tmp_path / "env", "--dataset", "arith", "--limit", 2)
    assert summary["data_path"] == test_json and summary["n"] == 2


def test_dataset_errors(llama_dir, tmp_path):
    (tmp_path / "dataset" / "onlytrain").mkdir(parents=True)
    (tmp_path / "dataset" / "onlytrain" / "train.json").write_text("[]")
    base = ["--base_model", llama_dir, "--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "dataset")]
    for argv, match in [
        (["--dataset", "nosuchset"], r"--dataset nosuchset: .*nosuchset/test\.json not found"),
        (["--dataset", "onlytrain"], "onlytrain/test.json not found"),
        ([], "give --dataset"),
    ]:
        with pytest.raises(InputError, match=match):
            evaluate_main(base + argv)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_sizes_are_input_errors(llama_dir, data_file):
    for flag in ("--batch_size", "--max_new_tokens", "--num_beams"):
        with pytest.raises(InputError, match="must be positive"):
            evaluate_main(["--base_model", llama_dir, "--data_path", data_file, flag, "0"])


# ---------------------------------------------------------------------------------------------------------------
# (e) accuracy is computed from the extracted answers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_model(llama_dir, tmp_path_factory):
    """The tiny llama with an output layer that can only favour digit tokens: every response holds a number."""
    model, tok = _load(llama_dir)
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    keep[digits] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
        model.lm_head.weight[keep] *= 10.0
    folder = tmp_path_factory.mktemp("digits")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_accuracy_is_exact(digit_model, tmp_path):
    # Prompts end in different digits (a bare template), so the extracted numbers differ between records.
    template = {"prompt_input": "{input} {instruction}", "prompt_no_input": "{instruction}", "response_split": "###"}
    template_file = _write(tmp_path / "bare.json", template)
    pairs = [(1, 2), (3, 9), (4, 4), (7, 5), (2, 8), (6, 6), (9, 1), (5, 3)]
    records = [{"instruction": f"Add {a} and {b}", "input": "", "answer": "0"} for a, b in pairs]
    flags = ["--prompt_template", template_file, "--batch_size", 3]
    _, rows = _run(digit_model, tmp_path / "probe", "--data_path", _write(tmp_path / "probe.json", records), *flags)
    extracted = [r["extracted"] for r in rows]
    assert None not in extracted and len(set(extracted)) > 2, extracted

    # Gold = the model's own answer for even records, a number it cannot produce (negative) for odd ones.
    for i, (rec, pred) in enumerate(zip(records, extracted)):
        rec["answer"] = pred if i % 2 == 0 else f"-{i}"
    summary, rows = _run(
        digit_model, tmp_path / "scored", "--data_path", _write(tmp_path / "sums.json", records), *flags
    )
    assert [r["extracted"] for r in rows] == extracted  # deterministic
    assert [r["correct"] for r in rows] == [True, False] * 4
    assert summary["correct"] == 4 and summary["accuracy"] == 0.5 and summary["accuracy_unit"] == "fraction"


# ---------------------------------------------------------------------------------------------------------------
# (f) the adapter's dropout is off during evaluation
# ---------------------------------------------------------------------------------------------------------------


def test_adapter_dropout_off_in_evaluation(llama_dir, data_file, tmp_path, train_argv, monkeypatch):
    adapter = tmp_path / "adapter"
    assert (
        train_main(train_argv(llama_dir, data_file, adapter, "--lora_dropout", "0.5", "--learning_rate", "1e-2")) == 0
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_dropout"] == 0.5

    models = []
    real = evaluate.load_eval_model

    def load(args):
        model, tokenizer = real(args)
        models.append((model, tokenizer))
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_eval_model", load)
    flags = ["--data_path", data_file, "--limit", 8, "--batch_size", 4, "--max_new_tokens", 6, "--adapter", adapter]
    _, rows1 = _run(llama_dir, tmp_path / "run1", *flags)
    _, rows2 = _run(llama_dir, tmp_path / "run2", *flags)
    assert [r["generation"] for r in rows1] == [r["generation"] for r in rows2]

    model, tok = models[0]
    dropouts = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in name]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    assert not model.training and not any(m.training for m in model.modules())
    # The check is meaningful: in train mode the adapter's dropout makes two forward passes differ.
    enc = tok([rows1[0]["prompt"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, model(**enc).logits)
        model.train()
        assert not torch.equal(model(**enc).logits, model(**enc).logits)
        model.eval()


def test_make_batches_longest_first_and_same_length_groups():
    from peft_bayes.cli.evaluate import make_batches

    lengths = [3, 9, 5, 9, 3, 3, 7]
    assert make_batches(lengths, 3) == [[1, 3, 6], [2, 0, 4], [5]]
    assert make_batches(lengths, 3, same_length=True) == [[1, 3], [6], [2], [0, 4, 5]]
    assert sorted(i for b in make_batches(lengths, 2, same_length=True) for i in b) == list(range(7))
