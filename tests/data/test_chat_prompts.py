"""--prompt_template chat: prompts, training texts, label masks and response splitting from a tokenizer's template."""

from __future__ import annotations

import copy

import pytest

from peft_bayes.data import ChatPrompter, Prompter, tokenize_record
from peft_bayes.errors import InputError

# A small ChatML template (the format of SmolLM2-Instruct and Qwen), without a default system turn.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaMA-2 style: the template writes the BOS token as text, and the tokenizer adds a BOS token itself.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
REC = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "5"}


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def test_markers_are_read_off_the_template(chat_tokenizer):
    p = Prompter.from_name("chat", tokenizer=chat_tokenizer)
    assert isinstance(p, ChatPrompter) and p.name == "chat"
    assert p.response_split == "<|im_start|>assistant\n"
    assert p.end_of_turn == "<|im_end|>"  # "<|im_end|>\n" with the trailing newline dropped
    assert not p.strip_bos  # the template writes no BOS


def test_exact_prompts_and_training_text(chat_tokenizer):
    p = Prompter.from_name("chat", tokenizer=chat_tokenizer)
    assert p.generate_prompt("Add 2 and 3.") == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    with_input = "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    assert p.generate_prompt("Add.", "2 and 3") == with_input
    assert p.generate_prompt("Add 2 and 3.", label="5") == (
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    )


def test_exact_label_mask(chat_tokenizer):
    """train_on_inputs=False: everything up to the assistant's answer is -100; the answer, its end of turn and EOS
    are learned."""
    tok = chat_tokenizer
    p = Prompter.from_name("chat", tokenizer=tok)
    prompt_ids = tok("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    answer_ids = tok("5<|im_end|>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    masked = tokenize_record(REC, tok, p, cutoff_len=256, train_on_inputs=False)
    assert masked["input_ids"] == prompt_ids + answer_ids
    assert masked["labels"] == [-100] * len(prompt_ids) + answer_ids
    full = tokenize_record(REC, tok, p, cutoff_len=256, train_on_inputs=True)
    assert full["labels"] == full["input_ids"] == masked["input_ids"]


def test_get_response_splits_full_and_new_token_decodes(chat_tokenizer):
    p = Prompter.from_name("chat", tokenizer=chat_tokenizer)
    prompt = p.generate_prompt("Add 2 and 3.")
    assert p.get_response(prompt + " 5<|im_end|>\n<|im_start|>user\nmore") == "5"  # full decode, specials kept
    assert p.get_response("5<|im_end|>\n<|im_start|>user") == "5"  # new tokens only, end of turn not special here
    assert p.get_response(" 5 \n") == "5"  # new tokens with special tokens skipped


def test_template_bos_is_not_doubled(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = BOS_TEMPLATE
    p = Prompter.from_name("chat", tokenizer=tok)
    assert p.strip_bos and p.response_split == "" and p.end_of_turn == " </s>"
    assert p.generate_prompt("Hi") == "[INST] Hi [/INST]"
    ids = tokenize_record({"instruction": "Hi", "output": "Yo"}, tok, p, cutoff_len=64)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id  # the template's EOS, not a second one


def test_tokenizer_without_chat_template_is_named(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match=f"tokenizer '{tmp_path}' has no chat template") as err:
        Prompter.from_name("chat", tokenizer=tok)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="needs the tokenizer"):
        Prompter.from_name("chat")
    with pytest.raises(InputError, match="available: alpaca, alpaca_short, chat"):
        Prompter.from_name("chatml")
