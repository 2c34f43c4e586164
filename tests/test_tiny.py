import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from peft_bayes.errors import InputError
from peft_bayes.tiny import TINY_ARCHITECTURES, build_tiny_model, build_tokenizer, save_tiny_model

TEXTS = [
    "### Instruction:\nTom has 3 apples. He buys 14 more apples.\n\n### Response:\n3 + 14 = 17. The answer is 17",
    "  two leading spaces, two trailing  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "Punctuation!? (brackets) [x] {y} <z> 'quotes' \"double\" a-b_c~d^e|f\\g/h @#$%&*+=;:,.`",
    "1234567890 0.5 -7 1e-3",
    "",
]
# The modules PEFT's LoRA targets by default on each architecture.
DEFAULT_TARGETS = {
    "llama": {"q_proj", "v_proj"},
    "gpt2": {"c_attn"},
    "opt": {"q_proj", "v_proj"},
    "bloom": {"query_key_value"},
    "gptj": {"q_proj", "v_proj"},
    "gpt_neox": {"query_key_value"},
}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok("x")["input_ids"].count(tok.eos_token_id) == 0  # EOS is the caller's to add
    assert len(tok) <= 512


def test_tokenizer_splits_digits_and_knows_template_words(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("12345")
    assert [t for t in tokens if t.strip("Ġ")] == list("12345")
    # The template markers are learned merges, not strings of single bytes.
    assert len(tiny_tokenizer.tokenize("### Instruction:\n")) <= 4
    assert len(tiny_tokenizer.tokenize(" Response")) == 1


def test_tokenizer_is_deterministic(tiny_tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


def test_tokenizer_custom_corpus_still_encodes_anything():
    tok = build_tokenizer(["aaa bbb aaa bbb"] * 10, vocab_size=300)
    assert len(tok) <= 300
    text = "never seen: Zürich ✓"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_prompt_tokens_are_a_prefix_of_the_full_text(tiny_tokenizer):
    # Masking the prompt out of the labels relies on this.
    prompt = "### Instruction:\nAnna has 5 pencils.\n\n### Response:\n"
    full = prompt + "5 - 2 = 3. The answer is 3"
    n = len(tiny_tokenizer(prompt)["input_ids"])
    assert tiny_tokenizer(full)["input_ids"][:n] == tiny_tokenizer(prompt)["input_ids"]


def test_unknown_architecture_is_one_line_input_error(tiny_tokenizer):
    with pytest.raises(InputError, match="known: llama, gpt2") as info:
        build_tiny_model("mamba", tiny_tokenizer)
    assert "\n" not in str(info.value)


def test_model_is_deterministic_and_leaves_global_rng_alone(tiny_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model("llama", tiny_tokenizer, seed=1)
    assert torch.equal(torch.rand(1), expected)
    b = build_tiny_model("llama", tiny_tokenizer, seed=1)
    c = build_tiny_model("llama", tiny_tokenizer, seed=2)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_sizes_and_overrides(tiny_tokenizer):
    model = build_tiny_model(
        "llama", tiny_tokenizer, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48, rms_norm_eps=1e-5
    )
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 3, 2)
    assert cfg.intermediate_size == 48 and cfg.rms_norm_eps == 1e-5
    assert model.lm_head.weight.std().item() == pytest.approx(32**-0.5, rel=0.1)
    with pytest.raises(InputError, match="divisible"):
        build_tiny_model("llama", tiny_tokenizer, hidden_size=30, num_heads=4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_architecture_saves_loads_and_generates(arch, tiny_tokenizer, tmp_path):
    model = build_tiny_model(arch, tiny_tokenizer)
    cfg = model.config
    assert cfg.vocab_size == len(tiny_tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
    )
    assert model.generation_config.pad_token_id == tiny_tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id
    if arch != "bloom":  # ALiBi has no position table
        positions = getattr(cfg, "max_position_embeddings", None) or cfg.n_positions
        assert positions >= 512

    path = save_tiny_model(tmp_path / arch, arch, tiny_tokenizer)
    assert (tmp_path / arch / "model.safetensors").is_file()
    assert not list((tmp_path / arch).glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    assert tokenizer(TEXTS[0])["input_ids"] == tiny_tokenizer(TEXTS[0])["input_ids"]

    # Batched greedy generation under left padding matches generating each prompt alone.
    tokenizer.padding_side = "left"
    prompts = ["Tom has 3 apples and 4 pears.", "Hi"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0
    with torch.no_grad():
        out = loaded.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        for i, prompt in enumerate(prompts):
            single = tokenizer([prompt], return_tensors="pt")
            alone = loaded.generate(**single, max_new_tokens=6, do_sample=False, min_new_tokens=6)
            assert torch.equal(out[i, -6:], alone[0, -6:]), (arch, i)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_peft_default_lora_targets_match(arch, tiny_tokenizer):
    config = LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")  # GPT-2's Conv1D stores W as in x out
    model = get_peft_model(build_tiny_model(arch, tiny_tokenizer), config)
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == DEFAULT_TARGETS[arch]
    if arch == "gpt2":
        assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn.base_layer, Conv1D)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
