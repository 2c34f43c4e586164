"""Fixtures shared by the bench tests."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_bayes.tiny import save_tiny_model


@pytest.fixture
def random_lora(tmp_path, tiny_tokenizer):
    """(base model folder, the in-memory PeftModel, its saved adapter folder): a one-layer tiny LLaMA with a LoRA on
    q_proj and v_proj whose B is random (an untrained LoRA has B = 0, which TFB refuses and Laplace would not see)."""
    base = save_tiny_model(tmp_path / "base", "llama", tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).eval()
    model.save_pretrained(tmp_path / "lora")
    return base, model, str(tmp_path / "lora")
