"""Tiny models of every architecture and a small synthetic data set, saved once per test session."""

from __future__ import annotations

import json

import pytest

from peft_bayes.tiny import TINY_ARCHITECTURES, save_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """arch -> folder of a saved tiny model (hidden 32, 2 layers) with the shared local tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_tiny_model(root / arch, arch, tokenizer=tiny_tokenizer, hidden_size=32, num_heads=4)
        for arch in TINY_ARCHITECTURES
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """32 synthetic arithmetic problems in the LLM-Adapters schema."""
    from peft_bayes.data.synthetic import make_arithmetic_problems

    path = tmp_path_factory.mktemp("data") / "arith.json"
    path.write_text(json.dumps(make_arithmetic_problems(32, seed=1)))
    return str(path)


@pytest.fixture(scope="session")
def train_argv():
    return _train_argv


def _train_argv(base, data, out, *extra):
    """A short, deterministic train.py command line (CPU, fp32, 2 optimizer steps per epoch)."""
    return [
        "--base_model",
        str(base),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--num_epochs",
        "1",
        "--max_steps",
        "2",
        "--val_set_size",
        "0",
        "--cutoff_len",
        "64",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--save_step",
        "1000",
        "--logging_steps",
        "1",
        "--prompt_template",
        "alpaca_short",
        *map(str, extra),
    ]
