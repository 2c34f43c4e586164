"""The Triton 4-bit product (dequantise inside the tile) against bitsandbytes' dequantise-then-matmul, in float64.

Real bitsandbytes ``Linear4bit`` layers, NF4 and FP4, with and without double quantisation, odd token and output
counts, fp32 / fp16 / bf16, with and without bias; forward and the gradient of x. On CPU in triton's interpreter.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

from peft_bayes.kernels import sampled_lora as sl
from peft_bayes.kernels.nf4_matmul import dequantize_4bit_reference, nf4_matmul, nf4_matmul_reference

pytestmark = pytest.mark.triton  # skipped without a Triton runtime; compiled on CUDA (tests/kernels/conftest.py)
DEVICE = sl.kernel_device().type
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _layer(d_in, d_out, quant_type, double_quant, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        d_in, d_out, bias=bias, compute_dtype=dtype, quant_type=quant_type, compress_statistics=double_quant
    )
    state = {"weight": torch.randn(d_out, d_in, generator=g)}
    if bias:
        state["bias"] = torch.randn(d_out, generator=g)
    layer.load_state_dict(state, strict=False)
    return layer.to(DEVICE)  # quantises


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("tokens,d_in,d_out", [(1, 64, 16), (37, 128, 70), (70, 192, 33)])
def test_matches_dequantise_then_matmul(quant_type, double_quant, tokens, d_in, d_out):
    layer = _layer(d_in, d_out, quant_type, double_quant, bias=True, dtype=torch.float32)
    assert layer.weight.quant_state.quant_type == quant_type and layer.weight.quant_state.nested == double_quant
    w64 = dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    x = torch.randn(tokens, d_in, device=DEVICE, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=DEVICE)
    y = nf4_matmul(x, layer.weight, layer.bias)
    (y * grad).sum().backward()
    want = x.detach().double() @ w64.T + layer.bias.double()
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()
    want_dx = grad.double() @ w64
    assert (x.grad.double() - want_dx).abs().max() <= 1e-5 * want_dx.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layer = _layer(128, 40, "nf4", True, bias=False, dtype=dtype)
    x = torch.randn(2, 9, 128, device=DEVICE, dtype=dtype, requires_grad=True)
    y = nf4_matmul(x, layer.weight)
    assert y.shape == (2, 9, 40) and y.dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype
    want = nf4_matmul_reference(x.detach().double(), layer.weight)
    assert (y.double() - want).abs().max() <= RTOL[dtype] * want.abs().max()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_reference_is_bitsandbytes(quant_type, double_quant):
    """The oracle itself: bitsandbytes' dequantize_4bit gives the same weight, its Linear4bit the same product."""
    layer = _layer(192, 24, quant_type, double_quant, bias=True, dtype=torch.float32)
    want_w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(dequantize_4bit_reference(layer.weight), want_w, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 192, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nf4_matmul_reference(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_wrong_width_is_an_error():
    layer = _layer(64, 8, "nf4", False, bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="x has 32 features, the weight expects 64"):
        nf4_matmul(torch.randn(3, 32, device=DEVICE), layer.weight)
