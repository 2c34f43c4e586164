"""Per-example K-FAC statistics: masked, weighted Gram matrices ``Σ w x xᵀ`` accumulated in fp32.

A Laplace posterior keeps, per adapter weight matrix, two Kronecker factors summed over the tokens of many batches:
``A = Σ a aᵀ`` (layer inputs, d_in x d_in) and ``G = Σ g gᵀ`` (output gradients, d_out x d_out). The activations
come in bf16 / fp16 / fp32 with padding, so the obvious ``flat = a.float() * mask; flat.T @ flat`` makes a
(tokens x d) fp32 copy per layer per batch just to feed one matmul. Here:

- ``accumulate_gram_(out, x, mask, row_weight)`` adds ``Σ_{r,t} mask[r,t] row_weight[r] x[r,t] x[r,t]ᵀ`` into the
  UPPER triangle (diagonal included) of the accumulator ``out``. The Triton kernel reads x tiles in their own dtype
  and accumulates ``tl.dot`` in fp32; no (tokens x d) copy is made. A Gram matrix is symmetric, so only the upper
  tiles are computed (about half the work), and ``mirror_upper_`` fills the lower triangle once, at the end.
- ``masked_row_sums(x, mask, mean)`` gives the per-row token sums (or means over the real tokens) in fp32: the first
  step of K-FAC's ``reduce`` flavour, whose Gram is then taken over rows instead of tokens.
- ``gram_reference`` / ``row_sums_reference``: plain PyTorch with the same semantics. CPU path and test oracle.

Tokens whose weight ``mask * row_weight`` is 0 are skipped, not multiplied by 0: their x is never read, so padding may
hold anything (even NaN). ``kfac_path`` picks the path: Triton for CUDA tensors, the reference elsewhere, with the
``PEFT_BAYES_KERNEL`` override of ``sampled_lora.kernel_path``. Nothing here imports more than torch and triton.
"""

from __future__ import annotations

import torch

from peft_bayes.kernels.sampled_lora import _interpreting, kernel_path, triton

if triton is not None:
    import triton.language as tl

    from peft_bayes.kernels.sampled_lora import _mm  # upcast-or-tensor-core dot, shared with the LoRA kernels

    @triton.jit
    def _gram_kernel(
        x_ptr, w_ptr, tile_ptr, out_ptr, N, D, stride_x, stride_os, stride_or, stride_oc,
        HAS_W: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # x (N, D) rows of stride ``stride_x``, w (N,) fp32 token weights, tiles (2, P) int64: the upper tile pairs
        # i <= j of a (D / BLOCK_D)^2 grid, row-major (so neighbouring programs share the row tile of x in L2).
        # Program (p, s): output tile (i, j) = tiles[:, p], summing token blocks s, s + SPLIT, ... (split-N fills the
        # GPU when d has few tiles). ACCUMULATE: one split, which owns its tile, so it adds into out (load-add-store,
        # no atomics). Else it stores its partial into out[s] (a (SPLIT, D, D) buffer) for the host to sum.
        p, split, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        n_tiles = tl.num_programs(0)
        i = tl.load(tile_ptr + p)
        j = tl.load(tile_ptr + n_tiles + p)
        rows = i * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        cols = j * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        rows_ok, cols_ok = rows < D, cols < D
        acc = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        for n0 in range(split * BLOCK_N, N, n_split * BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            keep = n < N
            if HAS_W:
                w = tl.load(w_ptr + n, mask=keep, other=0.0)
                keep = keep & (w != 0.0)  # weight-0 tokens (padding) are not read at all
            x_row = x_ptr + n[:, None] * stride_x
            xa = tl.load(x_row + rows[None, :], mask=keep[:, None] & rows_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            xb = tl.load(x_row + cols[None, :], mask=keep[:, None] & cols_ok[None, :], other=0.0)
            if DOT_F32:
                xa, xb = xa.to(tl.float32), xb.to(tl.float32)
            if HAS_W:
                # w x xᵀ = (w x) xᵀ: the weight goes on ONE operand (a sqrt on both would fail for negative weights).
                # On the fp16 / bf16 tensor-core path w x is rounded to the input dtype; 0/1 masks stay exact.
                xa = (xa.to(tl.float32) * w[:, None]).to(xb.dtype)
            acc += _mm(tl.trans(xa), xb, DOT_F32)  # (BLOCK_D, BLOCK_N) @ (BLOCK_N, BLOCK_D), fp32 accumulate
        # Upper entries only: a diagonal tile stores row <= col, the other upper tiles all of theirs.
        ok = rows_ok[:, None] & cols_ok[None, :] & (rows[:, None] <= cols[None, :])
        off = rows[:, None] * stride_or + cols[None, :] * stride_oc
        if ACCUMULATE:
            prev = tl.load(out_ptr + off, mask=ok, other=0.0)
            tl.store(out_ptr + off, prev + acc.to(prev.dtype), mask=ok)  # out: fp32 or fp64
        else:
            tl.store(out_ptr + split.to(tl.int64) * stride_os + off, acc, mask=ok)

    @triton.jit
    def _row_sums_kernel(
        x_ptr, m_ptr, out_ptr, T, D, stride_xr, stride_xt, stride_mr,
        HAS_MASK: tl.constexpr, MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # x (R, T, D) with unit stride in D, mask (R, T) as a number (bool passed as uint8), out (R, D) fp32.
        # Program (r, d block): Σ_t m[r, t] x[r, t, d] over T in blocks, fp32 accumulate from x's own dtype.
        r = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        count = tl.zeros((BLOCK_T,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            keep = t < T
            if HAS_MASK:
                m = tl.load(m_ptr + r * stride_mr + t, mask=keep, other=0).to(tl.float32)
                keep = keep & (m != 0.0)
            else:
                m = keep.to(tl.float32)
            x_off = r * stride_xr + t[:, None] * stride_xt + d[None, :]
            x = tl.load(x_ptr + x_off, mask=keep[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x * m[:, None], axis=0)
            count += tl.where(keep, m, 0.0)
        if MEAN:
            total = tl.sum(count, axis=0)
            acc = acc / tl.where(total != 0.0, total, 1.0)  # a row without real tokens: acc is 0, so is its mean
        tl.store(out_ptr + r * D + d, acc, mask=d_ok)


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kfac_path(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for K-FAC statistics of ``x``: Triton on CUDA tensors, the reference elsewhere,
    unless ``PEFT_BAYES_KERNEL`` says otherwise (see ``sampled_lora.kernel_path``: ``triton`` on CPU tensors needs
    the interpreter). fp64 inputs always take the reference (the kernels accumulate in fp32).

    Raises:
        RuntimeError: ``PEFT_BAYES_KERNEL=triton`` where triton cannot run these tensors.
    """
    path = kernel_path(x)
    return "triton" if path == "triton" and x.dtype in TRITON_DTYPES else "reference"


# ---------------------------------------------------------------------------------------------------------------
# Inputs: x (R, T, d) with mask (R, T) and row_weight (R,), or x (N, d) with mask (N,) and row_weight (N,).
# Both paths see the same (N, d) rows and (N,) token weights w = mask * row_weight (None: every token weight 1).
# ---------------------------------------------------------------------------------------------------------------


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _flatten(
    x: torch.Tensor, mask: torch.Tensor | None, row_weight: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows (N, d) in x's dtype, token weights (N,) in ``dtype`` or None)."""
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"x: expected a float (R, T, d) or (N, d) tensor, got {x.dtype} {tuple(x.shape)}")
    _check_shape("mask", mask, tuple(x.shape[:-1]))
    _check_shape("row_weight", row_weight, tuple(x.shape[:1]))
    w = None if mask is None else mask.to(dtype)  # (R, T) or (N,): small, tokens only
    if row_weight is not None:
        rw = row_weight.to(dtype)
        rw = rw[:, None] if x.dim() == 3 else rw
        w = rw.expand(x.shape[:-1]) if w is None else w * rw
    x2 = x.reshape(-1, x.shape[-1])  # a view for contiguous x; otherwise a copy in x's own dtype
    return x2, (None if w is None else w.reshape(-1))


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1]
    _check_shape("out", out, (d, d))
    if out.dtype not in (torch.float32, torch.float64) or out.device != x.device:
        raise ValueError(
            f"out: expected a float32 / float64 accumulator on {x.device}, got {out.dtype} on {out.device}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, computed in out's dtype (fp32 copies of x: fine on CPU, the reason the kernel exists).
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gram_reference(
    out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``accumulate_gram_`` in plain PyTorch: adds ``Σ w x xᵀ`` into the upper triangle of ``out``, in its dtype.

    Entries below the diagonal get ``+ 0.0`` (their values are unchanged). Returns ``out``.
    """
    _check_out(out, x)
    x2, w = _flatten(x, mask, row_weight, out.dtype)
    if w is not None:
        keep = w != 0  # skipped, not multiplied by 0: padding may hold NaN
        x2, w = x2[keep], w[keep]
    xf = x2.to(out.dtype)  # (N', d)
    gram = (xf if w is None else xf * w[:, None]).T @ xf  # (d, d)
    return out.add_(gram.triu_())


@torch.no_grad()
def row_sums_reference(x: torch.Tensor, mask: torch.Tensor | None = None, mean: bool = False) -> torch.Tensor:
    """``masked_row_sums`` in plain PyTorch: (R, d) in fp32 (fp64 for fp64 x)."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x: expected a float (R, T, d) tensor, got {x.dtype} {tuple(x.shape)}")
    _check_shape("mask", mask, tuple(x.shape[:2]))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = x.new_ones(x.shape[:2], dtype=dtype) if mask is None else mask.to(dtype)  # (R, T)
    xf = torch.where((m != 0)[..., None], x.to(dtype), 0.0)  # padding skipped, not multiplied (may be NaN)
    sums = torch.einsum("rt,rtd->rd", m, xf)
    if not mean:
        return sums
    count = m.sum(1, keepdim=True)
    return torch.where(count != 0, sums / torch.where(count != 0, count, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Triton launchers.
# ---------------------------------------------------------------------------------------------------------------


def _n_splits(x: torch.Tensor, n_tiles: int, token_blocks: int) -> int:
    """Split-N factor: about four programs per SM on a GPU when d has few tiles (e.g. the LoRA rank); none on CPU
    (the interpreter is serial)."""
    if x.device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(token_blocks, triton.cdiv(programs, n_tiles)))


def _gram_triton(
    out: torch.Tensor,
    x2: torch.Tensor,
    w: torch.Tensor | None,
    *,
    n_split: int | None = None,
    block_d: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``out`` (d, d) upper triangle += Σ w x xᵀ for rows x2 (N, d), token weights w (N,) fp32 or None.
    ``n_split`` / ``block_d`` / ``block_n`` override the defaults (tests: several tiles and splits on small d)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, d = x2.shape
    if n == 0 or d == 0:
        return out
    # 16: tl.dot's minimum; 64 x 64 fp32 accumulators stay in registers.
    block_d = block_d or min(64, max(16, triton.next_power_of_2(d)))
    block_n = block_n or min(64, max(16, triton.next_power_of_2(n)))
    tiles = torch.triu_indices(*(2 * [triton.cdiv(d, block_d)]), device=x2.device)  # (2, P): i <= j only
    n_tiles = tiles.shape[1]
    n_split = n_split or _n_splits(x2, n_tiles, triton.cdiv(n, block_n))
    flags = {
        "HAS_W": w is not None,
        "ACCUMULATE": n_split == 1,
        "DOT_F32": x2.dtype == torch.float32 or _interpreting(),
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
    }
    w = w.contiguous() if w is not None else x2  # x2: an unused pointer when HAS_W is off
    if n_split == 1:
        _gram_kernel[(n_tiles, 1)](x2, w, tiles, out, n, d, x2.stride(0), 0, out.stride(0), out.stride(1), **flags)
        return out
    # Partials (SPLIT, d, d) fp32, upper entries only (the rest stay 0): summed here, deterministically.
    part = torch.zeros(n_split, d, d, device=x2.device, dtype=torch.float32)
    _gram_kernel[(n_tiles, n_split)](x2, w, tiles, part, n, d, x2.stride(0), d * d, d, 1, **flags)
    return out.add_(part.sum(0))


def _row_sums_triton(x: torch.Tensor, mask: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """(R, d) fp32 row sums of x (R, T, d) from its own dtype; mask (R, T) or None."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    r, t, d = x.shape
    out = torch.empty(r, d, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if mask is not None:
        mask = mask.contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes, a number to load
    block_t = min(32, max(16, triton.next_power_of_2(t)))
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    m = mask if mask is not None else x
    _row_sums_kernel[(r, triton.cdiv(d, block_d))](
        x,
        m,
        out,
        t,
        d,
        x.stride(0),
        x.stride(1),
        (mask.stride(0) if mask is not None else 0),
        HAS_MASK=mask is not None,
        MEAN=mean,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Public API: each call picks its path through ``kfac_path``.
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def accumulate_gram_(
    out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Adds ``Σ_{r,t} mask[r,t] · row_weight[r] · x[r,t] x[r,t]ᵀ`` into the upper triangle of ``out``, in place.

    Args:
        out: (d, d) float32 accumulator (float64 for float64 x, which takes the reference path). Only its upper
            triangle, diagonal included, is read and written; call ``mirror_upper_`` once when done.
        x: (R, T, d) rows of tokens, or (N, d) tokens; float32 / float16 / bfloat16 (read in place) or float64.
        mask: (R, T) (resp. (N,)) bool / int / float token weights, e.g. the attention mask; None: all ones.
            Tokens of weight 0 are skipped: their x is never read.
        row_weight: (R,) (resp. (N,)) float weight of each row; None: all ones.

    Returns:
        ``out``. No autograd: these are statistics.
    """
    _check_out(out, x)
    if kfac_path(x) == "reference":
        return gram_reference(out, x, mask, row_weight)
    x2, w = _flatten(x, mask, row_weight, torch.float32)
    return _gram_triton(out, x2, w)


@torch.no_grad()
def masked_row_sums(x: torch.Tensor, mask: torch.Tensor | None = None, mean: bool = False) -> torch.Tensor:
    """Per-row token sums ``Σ_t mask[r,t] x[r,t]`` (K-FAC ``reduce``: the Gram is then taken over rows).

    Args:
        x: (R, T, d) float tensor, read in its own dtype.
        mask: (R, T) bool / int / float token weights; None: all ones. Tokens of weight 0 are not read.
        mean: divide each row by ``Σ_t mask[r,t]`` (the mean over its real tokens; 0 for a row without any).

    Returns:
        (R, d) float32 (float64 for float64 x).
    """
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x: expected a float (R, T, d) tensor, got {x.dtype} {tuple(x.shape)}")
    if kfac_path(x) == "reference":
        return row_sums_reference(x, mask, mean)
    _check_shape("mask", mask, tuple(x.shape[:2]))
    return _row_sums_triton(x, mask, mean)


def mirror_upper_(out: torch.Tensor) -> torch.Tensor:
    """Copies the upper triangle of the (d, d) ``out`` onto its lower one, in place (once, after accumulating)."""
    if out.dim() != 2 or out.shape[0] != out.shape[1]:
        raise ValueError(f"out: expected a square (d, d) matrix, got {tuple(out.shape)}")
    # triu(out) has zeros below the diagonal and triu(out, 1)ᵀ zeros on and above it: the sum is exact.
    return out.copy_(torch.triu(out).add_(torch.triu(out, 1).mT))
