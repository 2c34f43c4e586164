"""Trainable-parameter counts on LLaMA-7B's shapes (built on the meta device: no memory, no download).

The README's table quotes these numbers next to LLM-Adapters' (LoRA r=8 on q,v: 4.2M; bottleneck adapters: ~200M).
Formula, per adapted module: sequential adapter b * (d + d) with d its width on the side it sits, parallel adapter
b * (d_in + d_out), LoRA r * (d_in + d_out); times 32 layers.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_bayes import BottleneckConfig, ParallelAdapterConfig

HIDDEN, FFN, LAYERS, B = 4096, 11008, 32, 256
LLAMA_7B = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=32)

CASES = {
    # name: (config, formula)
    "lora r=8 q,v": (
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        LAYERS * 2 * 8 * (HIDDEN + HIDDEN),
    ),
    "adapterh": (BottleneckConfig(bottleneck_size=B), LAYERS * 2 * B * (HIDDEN + HIDDEN)),
    "adapterp": (BottleneckConfig(bottleneck_size=B, preset="adapterp"), LAYERS * B * (HIDDEN + HIDDEN)),
    # gate_proj and up_proj: adapters on their 4096-wide input; down_proj: on its 4096-wide output.
    "bottleneck (LLM-Adapters placement)": (
        BottleneckConfig(bottleneck_size=B, preset="llm-adapters"),
        LAYERS * 3 * B * (HIDDEN + HIDDEN),
    ),
    "parallel q,k,v": (ParallelAdapterConfig(bottleneck_size=B), LAYERS * 3 * B * (HIDDEN + HIDDEN)),
    "parallel up,down (LLM-Adapters' math command)": (
        ParallelAdapterConfig(bottleneck_size=B, target_modules=["up_proj", "down_proj"]),
        LAYERS * 2 * B * (HIDDEN + FFN),
    ),
}
EXPECTED = {
    "lora r=8 q,v": 4_194_304,
    "adapterh": 134_217_728,
    "adapterp": 67_108_864,
    "bottleneck (LLM-Adapters placement)": 201_326_592,
    "parallel q,k,v": 201_326_592,
    "parallel up,down (LLM-Adapters' math command)": 247_463_936,
}


@pytest.mark.parametrize("name", list(CASES))
def test_llama_7b_counts(name):
    config, formula = CASES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B))
        trainable, total = get_peft_model(model, config).get_nb_trainable_parameters()
    assert trainable == formula == EXPECTED[name]
