"""A locally trained tokenizer and tiny randomly initialised causal LMs, for tests and demos that run offline.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in a fraction of a second on a small
built-in corpus, and the models are built from configs. Typical use::

    >>> from peft_bayes.tiny import build_tiny_model, build_tokenizer, save_tiny_model
    >>> tokenizer = build_tokenizer()
    >>> model = build_tiny_model("llama", tokenizer)
    >>> save_tiny_model("/tmp/tiny-llama")  # model + tokenizer, loadable with the Auto* classes
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from peft_bayes.data.synthetic import make_arithmetic_problems
from peft_bayes.errors import InputError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)
TINY_ARCHITECTURES = ("llama", "gpt2", "opt", "bloom", "gptj", "gpt_neox")

# Covers the Alpaca prompt templates, so their words become single tokens.
_TEMPLATE_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "The answer is true. The answer is false. The answer is A. The answer is B. The answer is C. The answer is D.",
)


def _default_corpus() -> list[str]:
    problems = make_arithmetic_problems(200, seed=0)
    texts = [f"### Instruction:\n{p['instruction']}\n\n### Response:\n{p['output']}" for p in problems]
    return list(_TEMPLATE_TEXT) * 20 + texts


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE tokenizer.

    Byte-level means any text encodes without unknown tokens and decodes back to itself. Digits are always split
    into single-digit tokens, which helps arithmetic. Encoding prepends ``<s>`` like LLaMA's tokenizer; EOS is not
    appended. Training is deterministic: the same corpus and vocabulary size give the same tokenizer.

    Args:
        corpus: Texts to learn merges from. Defaults to the Alpaca prompt templates plus synthetic arithmetic
            problems (:mod:`peft_bayes.data.synthetic`).
        vocab_size: Upper bound on the vocabulary size, special tokens and the 256 byte tokens included. A small
            corpus may stop short of it.

    Returns:
        A fast tokenizer with ``bos_token="<s>"``, ``eos_token="</s>"``, ``pad_token="<pad>"`` (distinct from EOS)
        and ``unk_token="<unk>"``. Its ``padding_side`` is the library default; callers set it.
    """
    texts = _default_corpus() if corpus is None else list(corpus)
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def _config(arch: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> PretrainedConfig:
    """The config of ``arch`` at the given size, dropout off (so train- and eval-mode outputs agree)."""
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=2048,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=2048,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden_size,
            word_embed_proj_dim=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            ffn_dim=intermediate_size,
            max_position_embeddings=2048,
            dropout=0.0,
        )
    if arch == "bloom":  # ALiBi: no position limit
        return BloomConfig(hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads)
    if arch == "gptj":
        return GPTJConfig(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=2048,
            rotary_dim=hidden_size // num_heads,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=2048,
        )
    raise InputError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHITECTURES)}")


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    intermediate_size: int | None = None,
    initializer_range: float | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Builds a randomly initialised causal LM of one of the :data:`TINY_ARCHITECTURES`.

    Args:
        arch: One of ``"llama"``, ``"gpt2"``, ``"opt"``, ``"bloom"``, ``"gptj"``, ``"gpt_neox"``.
        tokenizer: Gives the vocabulary size and the BOS / EOS / PAD ids.
        hidden_size: Width of the residual stream; must be divisible by ``num_heads``.
        num_layers: Number of transformer blocks.
        num_heads: Number of attention heads.
        seed: Seed of the initialisation; the global RNG state is left untouched.
        intermediate_size: Width of the MLP, ``4 * hidden_size`` by default (BLOOM fixes it at that).
        initializer_range: Standard deviation of the random weights, ``hidden_size ** -0.5`` by default. The
            configs' own 0.02 is tuned for widths of 768 and more: at width 64 it caps the logits of the frozen
            ``lm_head`` near +-1.3, so no adapter trained on top could make a confident prediction.
        overrides: Further config attributes, set on the config as given (e.g. ``tie_word_embeddings=False``).

    Returns:
        The model in float32 and eval mode, with ``generation_config`` carrying the pad and EOS ids. Module names
        are those of the real architecture, so PEFT's default LoRA target modules match.

    Raises:
        InputError: ``arch`` is unknown or ``hidden_size`` is not divisible by ``num_heads``.
    """
    if arch not in TINY_ARCHITECTURES:
        raise InputError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHITECTURES)}")
    if hidden_size % num_heads:
        raise InputError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = _config(arch, hidden_size, num_layers, num_heads, intermediate_size or 4 * hidden_size)
    std = hidden_size**-0.5 if initializer_range is None else initializer_range
    setattr(config, "init_std" if arch == "opt" else "initializer_range", std)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    **kwargs: Any,
) -> str:
    """Builds a tiny model and saves it with its tokenizer, loadable offline with the ``Auto*`` classes.

    Args:
        path: Output folder, created if missing.
        arch: One of :data:`TINY_ARCHITECTURES`.
        tokenizer: Tokenizer to build the model for and save beside it; :func:`build_tokenizer` by default.
        kwargs: Passed on to :func:`build_tiny_model` (sizes, ``seed``, config overrides).

    Returns:
        ``path`` as a string. The folder holds ``config.json``, ``model.safetensors``, the generation config and
        the tokenizer files.
    """
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    model = build_tiny_model(arch, tokenizer, **kwargs)
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
