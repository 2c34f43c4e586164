"""A 4-bit (NF4 / FP4) base layer's product ``x W^T`` as one Triton kernel that dequantises W tile by tile.

bitsandbytes' training path dequantises the whole weight into a (d_out, d_in) temporary and calls cuBLAS, in forward
and again in backward. The kernels here never build that matrix: each program loads the packed 4-bit codes of a
(BLOCK_N, BLOCK_K) tile of W, looks them up in the 16-entry code table, scales them by their block's absmax, and
feeds the tile straight into ``tl.dot``. Whether that beats dequantise + cuBLAS is a question for the GPU:
``bench/bench_sampled_lora.py`` measures it (base ``nf4-triton``); the BayesLoRA layers keep bitsandbytes' product.

Layout (bitsandbytes ``quantize_4bit``, any quant type): W (N, K) flattened row-major, element i stored in byte
i // 2 (even i in the high nibble), scaled by ``absmax[i // blocksize]``. Double quantisation stores absmax itself
8-bit quantised: it is dequantised once on the host (N * K / blocksize floats, small).

``nf4_matmul_reference`` (the whole weight dequantised in plain torch, then one matmul: what bitsandbytes does) is
the test oracle. Nothing here imports more than torch and triton.
"""

from __future__ import annotations

import torch

from peft_bayes.kernels.sampled_lora import _interpreting, triton

if triton is not None:
    import triton.language as tl

    from peft_bayes.kernels.sampled_lora import _mm  # upcast-or-tensor-core dot, shared with the LoRA kernels

    @triton.jit
    def _dequant_tile(q_ptr, code_ptr, absmax_ptr, n, k, K, BLOCKSIZE: tl.constexpr, mask):
        # W[n, k] for a (rows, cols) grid of int64 indices: nibble lookup in the code table times the block's absmax.
        i = n * K + k
        byte = tl.load(q_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        scale = tl.load(absmax_ptr + i // BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(code_ptr + nibble) * scale  # fp32

    @triton.jit
    def _nf4_fwd_kernel(
        x_ptr, q_ptr, code_ptr, absmax_ptr, bias_ptr, y_ptr, T, K, N,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCKSIZE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # y[t, n] = sum_k x[t, k] W[n, k] (+ bias[n]); one (BLOCK_T, BLOCK_N) output tile per program.
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        t_ok, n_ok = t < T, n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = k < K
            x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = _dequant_tile(
                q_ptr, code_ptr, absmax_ptr, n[:, None], k[None, :], K, BLOCKSIZE, n_ok[:, None] & k_ok[None, :]
            )
            acc += _mm(x, tl.trans(w.to(x.dtype)), DOT_F32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_mask = t_ok[:, None] & n_ok[None, :]
        tl.store(y_ptr + t[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _nf4_bwd_kernel(
        dy_ptr, q_ptr, code_ptr, absmax_ptr, dx_ptr, T, K, N,
        DOT_F32: tl.constexpr, BLOCKSIZE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # dx[t, k] = sum_n dy[t, n] W[n, k]; one (BLOCK_T, BLOCK_K) tile per program, looping over N.
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        t_ok, k_ok = t < T, k < K
        acc = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            n_ok = n < N
            dy = tl.load(dy_ptr + t[:, None] * N + n[None, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            w = _dequant_tile(
                q_ptr, code_ptr, absmax_ptr, n[:, None], k[None, :], K, BLOCKSIZE, n_ok[:, None] & k_ok[None, :]
            )
            acc += _mm(dy, w.to(dy.dtype), DOT_F32)
        tl.store(
            dx_ptr + t[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & k_ok[None, :]
        )


def _absmax(quant_state) -> torch.Tensor:
    """Per-block absmax in float32, undoing double quantisation: the 8-bit absmax codes index ``state2.code`` and are
    scaled by their own block's ``state2.absmax``, plus ``offset``."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    q, inner = quant_state.absmax, quant_state.state2
    scale = inner.absmax.float().repeat_interleave(inner.blocksize)[: q.numel()]
    return inner.code.float()[q.long()] * scale + quant_state.offset


def dequantize_4bit_reference(weight) -> torch.Tensor:
    """The whole (d_out, d_in) float32 weight from a bitsandbytes ``Params4bit``, in plain torch (the test oracle)."""
    qs = weight.quant_state
    packed = weight.data.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # element 2j: high nibble of byte j
    values = qs.code.float()[codes] * _absmax(qs).repeat_interleave(qs.blocksize)[: codes.numel()]
    return values[: qs.shape[0] * qs.shape[1]].reshape(qs.shape)


def _tiles(dtype: torch.dtype) -> dict:
    dot_f32 = dtype == torch.float32 or _interpreting()
    return {"DOT_F32": dot_f32, "BLOCK_T": 32 if dot_f32 else 64, "BLOCK_N": 64, "BLOCK_K": 32 if dot_f32 else 64}


class _Nf4Matmul(torch.autograd.Function):
    """x (T, K) @ W^T (+ bias) with W frozen in 4 bits; backward gives dx only (the base layer does not train)."""

    @staticmethod
    def forward(ctx, x, packed, code, absmax, bias, shape: tuple[int, int], blocksize: int):
        (t, k), n = x.shape, shape[0]
        y = torch.empty(t, n, device=x.device, dtype=x.dtype)
        tiles = _tiles(x.dtype)
        grid = (triton.cdiv(t, tiles["BLOCK_T"]), triton.cdiv(n, tiles["BLOCK_N"]))
        has_bias = bias is not None
        _nf4_fwd_kernel[grid](
            x,
            packed,
            code,
            absmax,
            bias if has_bias else x,
            y,
            t,
            k,
            n,
            HAS_BIAS=has_bias,
            BLOCKSIZE=blocksize,
            **tiles,
        )
        ctx.save_for_backward(packed, code, absmax)
        ctx.meta = (t, k, n, blocksize)
        return y

    @staticmethod
    def backward(ctx, dy):
        packed, code, absmax = ctx.saved_tensors
        t, k, n, blocksize = ctx.meta
        dy = dy.contiguous()
        dx = torch.empty(t, k, device=dy.device, dtype=dy.dtype)
        tiles = _tiles(dy.dtype)
        grid = (triton.cdiv(t, tiles["BLOCK_T"]), triton.cdiv(k, tiles["BLOCK_K"]))
        _nf4_bwd_kernel[grid](dy, packed, code, absmax, dx, t, k, n, BLOCKSIZE=blocksize, **tiles)
        return dx, None, None, None, None, None, None


def nf4_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + bias`` for a bitsandbytes 4-bit weight (``Linear4bit.weight``: packed data + ``quant_state``).

    Args:
        x: (..., d_in) in the compute dtype (fp32, fp16 or bf16).
        weight: a ``bitsandbytes.nn.Params4bit`` (NF4 or FP4, with or without double quantisation).
        bias: optional (d_out,).

    Returns:
        (..., d_out) in ``x``'s dtype; differentiable in x.
    """
    qs = weight.quant_state
    n, k = qs.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, the weight expects {k}")
    code = qs.code.to(device=x.device, dtype=torch.float32)
    absmax = _absmax(qs).to(x.device)
    x2 = x.reshape(-1, k).contiguous()
    packed = weight.data.reshape(-1).view(torch.uint8)
    y = _Nf4Matmul.apply(x2, packed, code, absmax, bias, (n, k), int(qs.blocksize))
    return y.view(*x.shape[:-1], n)


def nf4_matmul_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product the way bitsandbytes trains: dequantise the whole weight, then one matmul."""
    w = dequantize_4bit_reference(weight).to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
