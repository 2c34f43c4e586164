"""Bottleneck and parallel adapters against closed forms, on every base layer type they support.

The invariants every tuner shares (identity at init, disable, save/load, switching, checkpointing, bf16, 4-bit) are
in test_battery.py; this file checks what is particular to these two tuners.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import peft_bayes
from peft_bayes import BottleneckConfig, ParallelAdapterConfig
from peft_bayes.tiny import build_tiny_model
from peft_bayes.tuners.adapter_mlp import BERT_INIT_STD
from peft_bayes.tuners.bottleneck import BottleneckLayer
from peft_bayes.tuners.parallel import ParallelLayer

ACTS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu}


class Net(nn.Module):
    """One layer to adapt, named ``proj``, with a 9 -> 13 Linear (odd sizes on purpose)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _adapted(layer: nn.Module, config) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Net(layer), config)
    with torch.no_grad():  # random, non-identity adapter weights
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def _shapes(layer, name: str = "default") -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(layer.adapter_down[name].weight.shape), tuple(layer.adapter_up[name].weight.shape)


def _mlp_ref(layer, h: torch.Tensor, act, name: str = "default") -> torch.Tensor:
    """s * up(act(down(h))) in float64 from the adapter's own weights."""
    down, up = layer.adapter_down[name].weight.double(), layer.adapter_up[name].weight.double()
    scaling = layer.adapter_scaling[name]
    scale = layer.adapter_scale[name].double() if scaling == "learned" else scaling
    return scale * (act(h @ down.T) @ up.T)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("scaling", [1.0, 2.5, "learned"])
def test_sequential_output_side_closed_form(act, scaling):
    model = _adapted(
        nn.Linear(9, 13),
        BottleneckConfig(target_modules=["proj"], bottleneck_size=5, non_linearity=act, scaling=scaling),
    )
    layer = model.base_model.model.proj
    assert isinstance(layer, BottleneckLayer)
    assert _shapes(layer) == ((5, 13), (13, 5))
    x = torch.randn(3, 4, 9)
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    h = x.double() @ w.T + b
    expected = h + _mlp_ref(layer, h, ACTS[act])
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_sequential_input_side_closed_form():
    cfg = BottleneckConfig(target_modules=["proj"], input_side_modules=["proj"], bottleneck_size=4)
    model = _adapted(nn.Linear(9, 13), cfg)
    layer = model.base_model.model.proj
    assert _shapes(layer) == ((4, 9), (9, 4))  # in -> b -> in
    x = torch.randn(2, 9)
    x2 = x.double() + _mlp_ref(layer, x.double(), torch.tanh)
    expected = x2 @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_parallel_closed_form_and_scaled_preset():
    cfg = ParallelAdapterConfig.scaled(target_modules=["proj"], bottleneck_size=6, non_linearity="relu")
    assert cfg.scaling == 4.0
    model = _adapted(nn.Linear(9, 13), cfg)
    layer = model.base_model.model.proj
    assert isinstance(layer, ParallelLayer)
    assert _shapes(layer) == ((6, 9), (13, 6))  # in -> b -> out
    x = torch.randn(5, 9)
    expected = x.double() @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    expected = expected + _mlp_ref(layer, x.double(), torch.relu)
    assert layer.parallel_scaling["default"] == 4.0 and "default" not in layer.parallel_scale
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_base_layer():
    conv = Conv1D(13, 9)  # nf=13 outputs, nx=9 inputs; weight stored 9 x 13
    for cfg in (
        BottleneckConfig(target_modules=["proj"], bottleneck_size=3),
        ParallelAdapterConfig(target_modules=["proj"], bottleneck_size=3),
    ):
        model = _adapted(conv, cfg)
        layer = model.base_model.model.proj
        assert (layer.in_features, layer.out_features) == (9, 13)
        x = torch.randn(2, 9)
        h = x.double() @ layer.base_layer.weight.double() + layer.base_layer.bias.double()
        expected = h + _mlp_ref(layer, h if isinstance(cfg, BottleneckConfig) else x.double(), torch.tanh)
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def _bnb_layer(kind: str) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    if kind == "8bit":
        layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes the weight


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("tuner", ["bottleneck", "parallel"])
def test_bitsandbytes_base_layers(kind, tuner):
    layer = _bnb_layer(kind)
    x = torch.randn(3, 64)
    with torch.no_grad():
        base_out = layer(x).double()  # the quantized layer itself is the reference for W x
    cls = BottleneckConfig if tuner == "bottleneck" else ParallelAdapterConfig
    model = _adapted(layer, cls(target_modules=["proj"], bottleneck_size=8))
    wrapped = model.base_model.model.proj
    assert type(wrapped.base_layer).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    expected = base_out + _mlp_ref(wrapped, base_out if tuner == "bottleneck" else x.double(), torch.tanh)
    out = model(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    grad = wrapped.adapter_down["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_learned_scaling_is_a_trainable_scalar_starting_at_one():
    model = get_peft_model(
        Net(nn.Linear(9, 13)), ParallelAdapterConfig(target_modules=["proj"], scaling="learned", bottleneck_size=4)
    )
    scale = model.base_model.model.proj.parallel_scale["default"]
    assert scale.shape == (1,) and scale.item() == 1.0 and scale.requires_grad
    assert "base_model.model.proj.parallel_scale.default" in dict(model.named_parameters())


def test_init_options():
    def weights_of(init):  # (down, up)
        torch.manual_seed(0)
        cfg = BottleneckConfig(target_modules=["proj"], bottleneck_size=256, init_weights=init)
        layer = get_peft_model(Net(nn.Linear(512, 512)), cfg).base_model.model.proj
        return layer.bottleneck_down["default"].weight, layer.bottleneck_up["default"].weight

    down, up = weights_of(True)
    assert up.abs().sum() == 0 and down.abs().sum() > 0
    bound = 1 / math.sqrt(512)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert down.abs().max() <= bound
    for w in weights_of("bert"):  # 131072 draws: the std is within 1% of 0.02
        assert abs(w.std().item() - BERT_INIT_STD) < 0.01 * BERT_INIT_STD and abs(w.mean().item()) < 1e-3
    assert weights_of(False)[1].abs().sum() > 0


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """A factory of identical tiny LLaMAs (hidden 32, 2 layers)."""
    return lambda: build_tiny_model("llama", tiny_tokenizer, hidden_size=32, num_heads=4).eval()


@pytest.mark.parametrize("cfg", [BottleneckConfig(bottleneck_size=4), ParallelAdapterConfig(bottleneck_size=4)])
def test_merging_is_refused_and_unload_returns_the_base(cfg, tiny_llama):
    base_out = tiny_llama()(input_ids=torch.arange(10)[None]).logits
    model = get_peft_model(tiny_llama(), cfg)
    with pytest.raises(ValueError, match="non-linear.*cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="non-linear"):
        model.merge_adapter()
    layer = model.base_model.model.model.layers[0]
    with pytest.raises(ValueError, match="cannot be merged"):
        next(m for m in layer.modules() if hasattr(m, "adapter_down")).merge()
    with torch.no_grad():  # the refused merges left the model as it was, adapters and all
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    assert not torch.allclose(model(input_ids=torch.arange(10)[None]).logits, base_out)
    unloaded = model.unload()
    assert isinstance(unloaded, LlamaForCausalLM)
    assert not any(hasattr(m, "adapter_down") for m in unloaded.modules())
    torch.testing.assert_close(unloaded(input_ids=torch.arange(10)[None]).logits, base_out, rtol=0, atol=0)


def test_two_active_sequential_adapters_compose_in_order():
    model = get_peft_model(
        Net(nn.Linear(9, 9)), BottleneckConfig(target_modules=["proj"], bottleneck_size=3, init_weights=False)
    )
    model.add_adapter("second", BottleneckConfig(target_modules=["proj"], bottleneck_size=3, init_weights=False))
    layer = model.base_model.model.proj
    layer.set_adapter(["default", "second"])
    x = torch.randn(4, 9)
    h = layer.base_layer(x).double()
    h = h + _mlp_ref(layer, h, torch.tanh, "default")
    h = h + _mlp_ref(layer, h, torch.tanh, "second")
    torch.testing.assert_close(model(x).double(), h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer"),
        ({"non_linearity": "swishy"}, "non_linearity 'swishy' is unknown"),
        ({"scaling": "lots"}, "scaling must be a number or 'learned'"),
        ({"scaling": float("nan")}, "scaling must be finite"),
        ({"adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\)"),
        ({"init_weights": "gaussian"}, "init_weights must be True, False or 'bert'"),
        ({"preset": "adapterx"}, "preset 'adapterx' is unknown"),
        ({"target_modules": ["down_proj"], "input_side_modules": ["up_proj"]}, r"input_side_modules \['up_proj'\]"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**kwargs)


def test_scaling_from_json_strings():
    assert BottleneckConfig(scaling="4").scaling == 4.0
    assert ParallelAdapterConfig(scaling="Learned").scaling == "learned"


def test_unknown_architecture_needs_target_modules():
    with pytest.raises(ValueError, match="no adapterh placement is known for model type 'custom'.*target_modules"):
        get_peft_model(Net(nn.Linear(4, 4)), BottleneckConfig())


def test_round_trip_keeps_input_side_and_learned_scale(tmp_path, tiny_llama):
    cfg = BottleneckConfig(preset="llm-adapters", bottleneck_size=4, scaling="learned", init_weights=False)
    model = get_peft_model(tiny_llama(), cfg)
    assert model.peft_config["default"].input_side_modules == {"gate_proj", "up_proj"}
    ids = torch.arange(12)[None]
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    up = loaded.base_model.model.model.layers[1].mlp.up_proj
    assert up.bottleneck_input_side["default"] and up.bottleneck_down["default"].in_features == 32
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert peft_bayes.registry.registered_tuners()["bottleneck"].prefix == "bottleneck_"


@pytest.mark.parametrize("tuner", ["bottleneck", "parallel"])
def test_checkpoint_key_layout(tuner):
    """One container per tensor, keyed by adapter name (PEFT's ``lora_A[name]`` layout): saved keys carry no name."""
    cls = BottleneckConfig if tuner == "bottleneck" else ParallelAdapterConfig
    model = get_peft_model(Net(nn.Linear(9, 13)), cls(target_modules=["proj"], bottleneck_size=3, scaling="learned"))
    model.add_adapter("other", cls(target_modules=["proj"], bottleneck_size=3, scaling="learned"))
    p = f"base_model.model.proj.{tuner}_"
    assert {n for n, _ in model.named_parameters() if ".other" in n} == {
        f"{p}down.other.weight",
        f"{p}up.other.weight",
        f"{p}scale.other",
    }
    expected = {f"{p}down.weight", f"{p}up.weight", f"{p}scale"}
    assert set(get_peft_model_state_dict(model, adapter_name="other")) == expected


def _to_old_layout(state_dict: dict, prefix: str, saved_as: str) -> dict:
    """Keys as earlier peft_bayes versions wrote them, before the per-tensor layout (checked against checkpoints saved
    by that code): one module per adapter, the name kept in the weights' keys and stripped by PEFT from the learned
    scale's."""
    old = {}
    for key, value in state_dict.items():
        key = re.sub(rf"\.{prefix}(down|up)\.weight$", rf".{prefix}adapter.{saved_as}.\1.weight", key)
        old[re.sub(rf"\.{prefix}scale$", f".{prefix}adapter.scale", key)] = value
    return old


@pytest.mark.filterwarnings("error:Found missing adapter keys")
@pytest.mark.parametrize("saved_as", ["default", "other"])
@pytest.mark.parametrize("tuner", ["bottleneck", "parallel"])
def test_checkpoints_in_the_old_key_layout_still_load(tuner, saved_as, tmp_path, tiny_llama):
    cls = BottleneckConfig if tuner == "bottleneck" else ParallelAdapterConfig
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), cls(bottleneck_size=4, scaling="learned", init_weights=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # the learned scales too
    ids = torch.arange(12)[None]
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    old = _to_old_layout(load_file(file), f"{tuner}_", saved_as)
    assert any(k.endswith(f"_adapter.{saved_as}.down.weight") for k in old)
    assert any(k.endswith("_adapter.scale") for k in old)
    save_file(old, file)
    for name in ("default", "mine"):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name=name).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
