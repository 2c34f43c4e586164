"""Prompt templates, record loading and tokenization (label masking, cutoff, EOS, validation split)."""

from __future__ import annotations

import json

import pytest

from peft_bayes.data import Prompter, available_templates, load_records, split_train_val, tokenize_record
from peft_bayes.errors import InputError

REC = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5", "answer": "5"}


def test_templates_ship_as_package_data():
    assert {"alpaca", "alpaca_short"} <= set(available_templates())
    p = Prompter.from_name("alpaca")
    with_input = p.generate_prompt("Sum.", "2 and 3")
    assert "### Instruction:\nSum.\n\n### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert "### Input:" not in p.generate_prompt("Sum.")
    assert p.generate_prompt("Sum.", label="5").endswith("### Response:\n5")
    assert p.get_response(p.generate_prompt("Sum.") + " 5 ") == "5"


def test_template_from_file_and_errors(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(
        json.dumps(
            {"prompt_input": "{instruction}|{input}|", "prompt_no_input": "{instruction}|", "response_split": "|"}
        )
    )
    assert Prompter.from_name(str(f)).generate_prompt("a", "b") == "a|b|"
    f.write_text(json.dumps({"prompt_input": "x"}))
    with pytest.raises(InputError, match="lacks the key"):
        Prompter.from_name(str(f))
    with pytest.raises(InputError, match="unknown prompt template"):
        Prompter.from_name("nope")


def test_load_records_json_jsonl_and_dir(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([REC, {**REC, "input": None, "answer": True}]))
    recs = load_records(str(tmp_path / "a.json"))
    assert recs[0] == REC and recs[1]["input"] == "" and recs[1]["answer"] == "true"
    (tmp_path / "b.jsonl").write_text(json.dumps(REC) + "\n\n" + json.dumps(REC) + "\n")
    assert len(load_records(str(tmp_path / "b.jsonl"))) == 2
    d = tmp_path / "set"
    d.mkdir()
    (d / "train.json").write_text(json.dumps([REC]))
    (d / "test.json").write_text(json.dumps([REC, REC]))
    assert len(load_records(str(d), split="train")) == 1
    assert len(load_records(str(d), split="test")) == 2


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "record 0 is a JSON int"),
        ('[{"instruction": ["a"], "output": "b"}]', "field 'instruction' is a list"),
        ('{"a": 1}', "expected a JSON list"),
        ("[", "malformed JSON at line 1"),
        ("[]", "empty"),
    ],
)
def test_load_records_errors(tmp_path, text, message):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_records(str(f))


def test_jsonl_error_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(REC) + "\n{oops\n")
    with pytest.raises(InputError, match="line 2"):
        load_records(str(f))


def test_split_is_seeded_and_disjoint():
    recs = [{**REC, "instruction": str(i)} for i in range(50)]
    train, val = split_train_val(recs, 10, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_train_val(recs, 10, seed=3) == (train, val)
    assert split_train_val(recs, 10, seed=4) != (train, val)
    with pytest.raises(InputError, match="leaves no training data"):
        split_train_val(recs, 50, seed=0)


def test_tokenize_masks_prompt_and_appends_eos(tiny_tokenizer):
    p = Prompter.from_name("alpaca_short")
    full = tokenize_record(REC, tiny_tokenizer, p, cutoff_len=256, train_on_inputs=True)
    masked = tokenize_record(REC, tiny_tokenizer, p, cutoff_len=256, train_on_inputs=False)
    assert full["input_ids"] == masked["input_ids"] and full["labels"] == full["input_ids"]
    assert full["input_ids"][-1] == tiny_tokenizer.eos_token_id
    n_prompt = len(tiny_tokenizer(p.generate_prompt(REC["instruction"]))["input_ids"])
    assert masked["labels"][:n_prompt] == [-100] * n_prompt
    assert masked["labels"][n_prompt:] == full["input_ids"][n_prompt:]
    response = tiny_tokenizer.decode([t for t in masked["labels"] if t != -100], skip_special_tokens=True)
    assert response == REC["output"]


def test_tokenize_respects_cutoff(tiny_tokenizer):
    p = Prompter.from_name("alpaca")
    out = tokenize_record(REC, tiny_tokenizer, p, cutoff_len=12, train_on_inputs=False)
    assert len(out["input_ids"]) == 12 and out["labels"] == [-100] * 12  # the prompt alone fills the cutoff
    assert tiny_tokenizer.eos_token_id not in out["input_ids"][1:]


def test_datasets_folder_goes_through_datasets_library(tmp_path):
    """A folder that is not in LLM-Adapters' layout is read by `datasets.load_dataset` (the Hub code path)."""
    import pandas as pd

    folder = tmp_path / "hub_style"
    (folder / "data").mkdir(parents=True)
    pd.DataFrame([REC, {**REC, "instruction": "Add 1 and 1."}]).to_parquet(folder / "data" / "train-00000.parquet")
    recs = load_records(str(folder))
    assert [r["instruction"] for r in recs] == ["Add 2 and 3.", "Add 1 and 1."] and recs[0]["output"] == REC["output"]


def test_unreachable_hub_name_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="'someone/no-such-set' is neither a local data file nor a loadable dataset"):
        load_records("someone/no-such-set")
