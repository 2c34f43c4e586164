"""The sampled low-rank update of a Bayesian LoRA layer (BLoB, Wang et al. 2024), pure-PyTorch reference.

One LoRA factor carries a diagonal Gaussian posterior ``W = M + sigma * E``, ``E ~ N(0, 1)``; the other is
deterministic. BLoB makes A (r x d_in) Bayesian; B (d_out x r) may be chosen instead. The layer adds
``s * B A x`` to the frozen layer's output. With *flipout* (Wen et al. 2018) one draw of E per forward pass serves
every token: token t uses ``W_t = M + (sigma * E) * (r_out[t] r_in[t]^T)`` with Rademacher signs ``r_in[t]``
(the factor's input width) and ``r_out[t]`` (its output width). That has exactly the marginal distribution of an
independent draw per token, but costs two elementwise products instead of a weight matrix per token. For A:

    h = x M^T + ((x * r_in) (sigma * E)^T) * r_out          (..., r)
    delta = s * h B^T                                        (..., d_out)

Two implementations sit behind one call, ``add_sampled_lora`` (the only one the tuner layer makes):

- the **reference** (``draw_noise``, ``flipout_linear``, ``sampled_lora_delta``): plain PyTorch, E and the signs
  drawn by torch's generator and held in memory. CPU path and test oracle.
- the **fused Triton path** (GPU; on CPU under ``TRITON_INTERPRET=1``): one kernel computes ``h = x M^T`` and the
  flipout noise path reading x once, with the per-token signs generated in registers by Philox from a (seed,
  offset) and never written to memory (32 signs from the bits of each draw); backward kernels regenerate them from
  the same seed. ``sigma * E`` is factor-sized, so it is drawn once per forward by a small kernel and kept for the
  backward. The B projection is then added into the base layer's output buffer in place (``addmm_``), so no
  (tokens x d_out) temporary is made.

``kernel_path`` picks one: Triton for CUDA tensors, the reference elsewhere; ``PEFT_BAYES_KERNEL=auto|triton|
reference`` overrides (``triton`` on CPU tensors needs the interpreter). Nothing here imports more than torch and
triton.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

try:  # triton is a Linux-only dependency; without it only the reference path exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on platforms without triton
    triton = None


@dataclass
class LoraNoise:
    """One forward pass's random draws for the Bayesian factor of shape (rows, cols).

    Attributes:
        eps: (rows, cols) standard normal E.
        sign_in: (..., cols) +-1, one row per token; None: every token shares ``M + sigma * E`` (no flipout).
        sign_out: (..., rows) +-1, one row per token; None exactly when ``sign_in`` is.
    """

    eps: torch.Tensor
    sign_in: torch.Tensor | None = None
    sign_out: torch.Tensor | None = None


def draw_noise(
    tokens: Sequence[int],
    factor_shape: tuple[int, int],
    flipout: bool = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> LoraNoise:
    """Draws E for a factor of ``factor_shape`` = (rows, cols) and, with flipout, Rademacher signs for inputs
    whose leading (token) dimensions are ``tokens`` (e.g. ``x.shape[:-1]``)."""
    rows, cols = factor_shape
    kw = {"device": device, "generator": generator}
    eps = torch.randn(rows, cols, dtype=dtype, **kw)
    if not flipout:
        return LoraNoise(eps)

    def signs(*shape: int) -> torch.Tensor:
        return (2 * torch.randint(0, 2, shape, **kw) - 1).to(dtype)

    return LoraNoise(eps, signs(*tokens, cols), signs(*tokens, rows))


def flipout_linear(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, noise: LoraNoise | None) -> torch.Tensor:
    """``x W^T`` for W ~ N(mean, std^2) drawn by ``noise`` (None: W = mean). x: (..., cols) -> (..., rows)."""
    out = x @ mean.t()
    if noise is None:
        return out
    perturbation = std * noise.eps  # (rows, cols)
    if noise.sign_in is None:
        return out + x @ perturbation.t()
    return out + ((x * noise.sign_in) @ perturbation.t()) * noise.sign_out


def sampled_lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    *,
    a_std: torch.Tensor | None = None,
    b_std: torch.Tensor | None = None,
    noise: LoraNoise | None = None,
    b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s * (B A x + bias)`` with one factor sampled from its Gaussian posterior; ``noise=None`` gives the mean.

    Args:
        x: (..., d_in) layer input (already through LoRA dropout).
        a: (r, d_in) A, or its posterior mean M when ``a_std`` is given.
        b: (d_out, r) B, or its posterior mean when ``b_std`` is given.
        scaling: LoRA's ``alpha / r`` (or ``alpha / sqrt(r)``).
        a_std, b_std: standard deviation of the Bayesian factor, same shape as it; give exactly one when
            ``noise`` is given.
        noise: the draws from ``draw_noise`` for the Bayesian factor's shape.
        b_bias: (d_out,) LoRA's optional bias on B.

    Returns:
        (..., d_out) in ``x``'s dtype. Differentiable in x, a, b, the std and the bias.
    """
    if noise is not None and (a_std is None) == (b_std is None):
        raise ValueError("sampled_lora_delta: give the std of exactly one factor (a_std or b_std) with noise")
    h = flipout_linear(x, a, a_std, noise if a_std is not None else None)  # (..., r)
    out = flipout_linear(h, b, b_std, noise if b_std is not None else None)  # (..., d_out)
    if b_bias is not None:
        out = out + b_bias
    return scaling * out


# ---------------------------------------------------------------------------------------------------------------
# Fused Triton path. Shapes: x (T, K) tokens x d_in, M and S = sigma (R, K), B (N, R), h (T, R), result (T, N).
# Noise layout, shared by every kernel so backward regenerates exactly what forward used:
#   E[r, k]      = randn(seed,     r * K + k)
#   r_in[t, k]   = bit (k mod 32) of randint(seed + 1, t * KW + k // 32), KW = ceil(K / 32): one Philox draw gives
#                  32 signs, so the tokens x d_in signs cost T * K / 32 draws per pass instead of T * K
#   r_out[t, r]  = bit (r mod 32) of randint(seed + 2, t * RW + r // 32), RW = ceil(R / 32): the same layout
# Offsets are int64 (Philox takes both 32-bit halves), so any T * K works.
# ---------------------------------------------------------------------------------------------------------------

KERNEL_ENV = "PEFT_BAYES_KERNEL"
KERNEL_MODES = ("auto", "triton", "reference")
MAX_RANK = 128

if triton is not None:

    @triton.jit
    def _bit_signs(seed, t, k, KW):
        # Signs of a (tokens, columns) matrix at tokens t (int64, any shape broadcasting with k) and columns k: bit
        # k % 32 of word (t, k // 32), KW words per token, computed entry by entry (a Philox draw each): the layout's
        # definition, for the kernels that write or use single entries.
        words = tl.randint(seed, t * KW + k // 32)
        return 1.0 - 2.0 * ((words >> (k % 32).to(tl.uint32)) & 1).to(tl.float32)

    @triton.jit
    def _tile_signs(seed, t, k0, KW, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        # The same signs for a tile: tokens t (int64, BLOCK_T), columns k0 .. k0 + BLOCK_K - 1, k0 a multiple of
        # BLOCK_K. One Philox draw per token and 32 columns, its bits spread over them: a (T, K/32, 32) tile reshaped
        # to (T, K), row-major; a tile of 16 columns lies inside one word, whose bits are shifted into place.
        if BLOCK_K >= 32:
            words = tl.randint(seed, t[:, None] * KW + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :])
            bits = (words[:, :, None] >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1
            return 1.0 - 2.0 * tl.reshape(bits, (BLOCK_T, BLOCK_K)).to(tl.float32)
        words = tl.randint(seed, t * KW + k0 // 32)
        shifts = (k0 % 32 + tl.arange(0, BLOCK_K)).to(tl.uint32)
        return 1.0 - 2.0 * ((words[:, None] >> shifts[None, :]) & 1).to(tl.float32)

    @triton.jit
    def _mm(a, b, DOT_F32: tl.constexpr):
        # DOT_F32: operands upcast (fp32 inputs, and every dtype under the CPU interpreter, whose bf16 arithmetic is
        # wrong: the kernels then upcast right after each load);
        # "ieee" keeps fp32 products exact like torch's default matmul (no TF32). Else fp16/bf16 tensor cores,
        # fp32 accumulation either way.
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _noise_kernel(e_ptr, sin_ptr, sout_ptr, T, K, R, seed, FLIPOUT: tl.constexpr, BLOCK: tl.constexpr):
        # Writes E (R, K) and, with flipout, r_in (T, K) and r_out (T, R): for tests and debugging only.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(e_ptr + i, tl.randn(seed, i), mask=i < R * K)
        if FLIPOUT:
            tl.store(sin_ptr + i, _bit_signs(seed + 1, i // K, i % K, tl.cdiv(K, 32)), mask=i < T * K)
            tl.store(sout_ptr + i, _bit_signs(seed + 2, i // R, i % R, tl.cdiv(R, 32)), mask=i < T * R)

    @triton.jit
    def _scaled_noise_kernel(s_ptr, w_ptr, e_ptr, N, seed, BLOCK: tl.constexpr):
        # E (fp32) and w = sigma * E (w's dtype) over the factor's N = R * K entries: one draw per forward, not per
        # token; the backward reads E for dS = E * (...).
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        e = tl.randn(seed, i)
        s = tl.load(s_ptr + i, mask=i < N, other=0.0).to(tl.float32)
        tl.store(e_ptr + i, e, mask=i < N)
        tl.store(w_ptr + i, (s * e).to(w_ptr.dtype.element_ty), mask=i < N)

    @triton.jit
    def _signed_rows_kernel(dh_ptr, out_ptr, T, R, seed, BLOCK: tl.constexpr):
        # out = dh * r_out over the T * R entries of dh (flat index t * R + r): the noise path's gradient, signed once
        # for both backward kernels.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        dh = tl.load(dh_ptr + i, mask=i < T * R, other=0.0)
        tl.store(out_ptr + i, dh * _bit_signs(seed, i // R, i % R, tl.cdiv(R, 32)), mask=i < T * R)

    @triton.jit
    def _down_fwd_kernel(
        x_ptr, m_ptr, w_ptr, h_ptr, T, K, R, seed,
        NOISE: tl.constexpr, FLIPOUT: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        # Program (token block, split s): BLOCK_T tokens, all R ranks, K blocks s, s + SPLIT, ... (split-K fills the
        # GPU when there are few token blocks). Each x tile is read once and feeds both the mean product and the noise
        # product; the signs live only in registers, w = sigma * E is read like M. Output: fp32 partial sums (SPLIT, T,
        # R), summed by the host (r_out is per (token, rank), so it applies to each partial).
        split, n_split = tl.program_id(1), tl.num_programs(1)
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        r = tl.arange(0, BLOCK_R).to(tl.int64)
        t_ok, r_ok = t < T, r < R
        kw = tl.cdiv(K, 32)
        acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)  # x M^T
        acc_noise = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)  # (x * r_in) (S * E)^T
        for k0 in range(split * BLOCK_K, K, n_split * BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = k < K
            x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            w_off = r[:, None] * K + k[None, :]
            w_ok = r_ok[:, None] & k_ok[None, :]
            m = tl.load(m_ptr + w_off, mask=w_ok, other=0.0).to(x.dtype)
            acc += _mm(x, tl.trans(m), DOT_F32)
            if NOISE:
                w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(x.dtype)  # (R, K) sample of sigma * E
                if FLIPOUT:
                    x = x * _tile_signs(seed + 1, t, k0, kw, BLOCK_T, BLOCK_K).to(x.dtype)
                acc_noise += _mm(x, tl.trans(w), DOT_F32)
        if NOISE:
            if FLIPOUT:
                acc_noise = acc_noise * _tile_signs(seed + 2, t, 0, tl.cdiv(R, 32), BLOCK_T, BLOCK_R)
            acc += acc_noise
        h_off = split.to(tl.int64) * T * R + t[:, None] * R + r[None, :]
        tl.store(h_ptr + h_off, acc, mask=t_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _down_bwd_dx_kernel(
        dh_ptr, dhs_ptr, m_ptr, w_ptr, dx_ptr, T, K, R, seed,
        NOISE: tl.constexpr, FLIPOUT: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        # dx = dh M + r_in * (dhs w), dhs = dh * r_out (signed by the host's call), w = sigma * E; one (BLOCK_T,
        # BLOCK_K) tile per program; R fits one block.
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        r = tl.arange(0, BLOCK_R).to(tl.int64)
        t_ok, k_ok, r_ok = t < T, k < K, r < R
        w_off = r[:, None] * K + k[None, :]
        w_ok = r_ok[:, None] & k_ok[None, :]
        m = tl.load(m_ptr + w_off, mask=w_ok, other=0.0)
        if DOT_F32:
            m = m.to(tl.float32)
        h_off = t[:, None] * R + r[None, :]
        h_ok = t_ok[:, None] & r_ok[None, :]
        dh = tl.load(dh_ptr + h_off, mask=h_ok, other=0.0)
        dx = _mm(dh.to(m.dtype), m, DOT_F32)
        if NOISE:
            w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(m.dtype)
            dhs = tl.load(dhs_ptr + h_off, mask=h_ok, other=0.0)
            dn = _mm(dhs.to(m.dtype), w, DOT_F32)
            if FLIPOUT:
                dn = dn * _tile_signs(seed + 1, t, k0, tl.cdiv(K, 32), BLOCK_T, BLOCK_K)
            dx += dn
        tl.store(
            dx_ptr + t[:, None] * K + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & k_ok[None, :]
        )

    @triton.jit
    def _down_bwd_dw_kernel(
        x_ptr, dh_ptr, dhs_ptr, e_ptr, dm_ptr, ds_ptr, T, K, R, seed,
        NOISE: tl.constexpr, FLIPOUT: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        # Program (k block, split s) sums tokens s, s + SPLIT, ... of dM = dh^T x and dS = E * (dhs^T (x * r_in)),
        # dhs = dh * r_out, into fp32 partials (SPLIT, R, K); the host sums the splits (deterministic, no atomics).
        pid_k, split, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        r = tl.arange(0, BLOCK_R).to(tl.int64)
        k_ok, r_ok = k < K, r < R
        kw = tl.cdiv(K, 32)
        acc_m = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        acc_s = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        for t0 in range(split * BLOCK_T, T, n_split * BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            t_ok = t < T
            x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            h_off = t[:, None] * R + r[None, :]
            h_ok = t_ok[:, None] & r_ok[None, :]
            dh = tl.load(dh_ptr + h_off, mask=h_ok, other=0.0)
            acc_m += _mm(tl.trans(dh.to(x.dtype)), x, DOT_F32)
            if NOISE:
                dhs = tl.load(dhs_ptr + h_off, mask=h_ok, other=0.0)
                if FLIPOUT:
                    x = x * _tile_signs(seed + 1, t, pid_k * BLOCK_K, kw, BLOCK_T, BLOCK_K).to(x.dtype)
                acc_s += _mm(tl.trans(dhs.to(x.dtype)), x, DOT_F32)
        w_off = r[:, None] * K + k[None, :]
        w_ok = r_ok[:, None] & k_ok[None, :]
        part = split.to(tl.int64) * R * K
        tl.store(dm_ptr + part + w_off, acc_m, mask=w_ok)
        if NOISE:
            e = tl.load(e_ptr + w_off, mask=w_ok, other=0.0)
            tl.store(ds_ptr + part + w_off, acc_s * e, mask=w_ok)


def _interpreting() -> bool:
    """Whether triton was imported in interpreter mode (``TRITON_INTERPRET=1`` before the import)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # pragma: no cover - older triton


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the fused kernels' token x feature tiles and their warps; None keeps the default."""

    block_t: int | None = None  # tokens per tile
    block_k: int | None = None  # input features (d_in) per tile
    num_warps: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_t", "block_k"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"Tiles: {name}={value} must be a power of two >= 16 (tl.dot's smallest tile)")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tiles: num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")

    @classmethod
    def parse(cls, text: str) -> Tiles:
        """``"64x128"`` (BLOCK_T x BLOCK_K) or ``"64x128w8"`` (and 8 warps)."""
        blocks, _, warps = text.strip().lower().partition("w")
        try:
            block_t, block_k = (int(v) for v in blocks.split("x"))
            num_warps = int(warps) if warps else None
        except ValueError:
            raise ValueError(f"tiles {text!r}: expected BLOCK_TxBLOCK_K[wWARPS], e.g. 64x128w8") from None
        return cls(block_t, block_k, num_warps)

    def __str__(self) -> str:
        return f"{self.block_t or 'auto'}x{self.block_k or 'auto'}" + (f"w{self.num_warps}" if self.num_warps else "")


_TILES: contextvars.ContextVar[Tiles | None] = contextvars.ContextVar("sampled_lora_tiles", default=None)


@contextmanager
def tile_sizes(tiles: Tiles) -> Iterator[Tiles]:
    """The fused kernels use ``tiles`` inside the block (for tuning benchmarks; any tiles give the same result up
    to summation order). BLOCK_R is always the rank padded to a power of two."""
    token = _TILES.set(tiles)
    try:
        yield tiles
    finally:
        _TILES.reset(token)


def _blocks(t: int, k: int, r: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, BLOCK_R): R padded to a power of two (>= 16, tl.dot's minimum), smaller tiles for big R
    so the fp32 accumulators stay in registers; ``tile_sizes`` overrides the first two."""
    block_r = max(16, triton.next_power_of_2(r))
    block_t = min(64 if block_r <= 32 else 32, max(16, triton.next_power_of_2(t)))
    block_k = min(64 if block_r <= 64 else 32, max(16, triton.next_power_of_2(k)))
    tiles = _TILES.get()
    if tiles is not None:
        block_t, block_k = tiles.block_t or block_t, tiles.block_k or block_k
    return block_t, block_k, block_r


def _launch_options() -> dict:
    """``num_warps`` of the token x feature kernels when ``tile_sizes`` sets it (else Triton's default)."""
    tiles = _TILES.get()
    return {} if tiles is None or tiles.num_warps is None else {"num_warps": tiles.num_warps}


def philox_noise(
    seed: int, tokens: int, factor_shape: tuple[int, int], flipout: bool = True, device="cpu"
) -> LoraNoise:
    """The exact E and signs the fused kernels generate for ``seed`` (float32), as a [`LoraNoise`] for the reference.

    Materialises what the kernels never store: for tests (kernel vs reference with identical noise) and debugging.
    """
    if triton is None:
        raise RuntimeError("philox_noise needs triton")
    rows, cols = factor_shape
    eps = torch.empty(rows, cols, device=device)
    sign_in = torch.empty(tokens, cols, device=device) if flipout else eps
    sign_out = torch.empty(tokens, rows, device=device) if flipout else eps
    n = max(rows * cols, tokens * max(cols, rows) if flipout else 0)  # one program covers all three arrays
    _noise_kernel[(triton.cdiv(n, 1024),)](
        eps, sign_in, sign_out, tokens, cols, rows, seed, FLIPOUT=flipout, BLOCK=1024
    )
    return LoraNoise(eps, sign_in, sign_out) if flipout else LoraNoise(eps)


def _k_splits(x: torch.Tensor, token_blocks: int, k_blocks: int) -> int:
    """Split-K factor of the forward: about four programs per SM on a GPU, none on CPU (the interpreter is serial)."""
    if x.device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(k_blocks, triton.cdiv(programs, token_blocks)))


def _scaled_noise(s: torch.Tensor, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, E): w = sigma * E (R, K) in ``dtype`` and E in float32, E drawn from ``seed`` in the kernels' layout."""
    w = torch.empty(s.shape, device=s.device, dtype=dtype)
    e = torch.empty(s.shape, device=s.device, dtype=torch.float32)
    _scaled_noise_kernel[(triton.cdiv(s.numel(), 1024),)](s, w, e, s.numel(), seed, BLOCK=1024)
    return w, e


def _signed_rows(dh: torch.Tensor, seed: int) -> torch.Tensor:
    """dh * r_out for the draw of ``seed`` (r_out's own seed is ``seed + 2``): (T, R) float32."""
    out = torch.empty_like(dh)
    _signed_rows_kernel[(triton.cdiv(dh.numel(), 1024),)](dh, out, dh.shape[0], dh.shape[1], seed + 2, BLOCK=1024)
    return out


def _kernel_flags(x: torch.Tensor, t: int, k: int, r: int, noise: bool, flipout: bool) -> dict:
    """The constexprs and launch options shared by the token x feature kernels."""
    bt, bk, br = _blocks(t, k, r)
    flags = {"NOISE": noise, "FLIPOUT": flipout, "DOT_F32": x.dtype == torch.float32 or _interpreting()}
    return {**flags, "BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_R": br, **_launch_options()}


def _down_forward(x, m, w, seed: int, noise: bool, flipout: bool, n_split: int | None = None) -> torch.Tensor:
    """h = x M^T (+ flipout noise with w = sigma * E): (T, R) float32. ``n_split``: split-K factor (default: by
    device)."""
    (t, k), r = x.shape, m.shape[0]
    flags = _kernel_flags(x, t, k, r, noise, flipout)
    bt, bk = flags["BLOCK_T"], flags["BLOCK_K"]
    n_split = n_split or _k_splits(x, triton.cdiv(t, bt), triton.cdiv(k, bk))
    h = torch.empty(n_split, t, r, device=x.device, dtype=torch.float32)
    _down_fwd_kernel[(triton.cdiv(t, bt), n_split)](x, m, w, h, t, k, r, seed, **flags)
    return h[0] if n_split == 1 else h.sum(0)


def _down_backward(x, m, w, e, dh, seed: int, noise: bool, flipout: bool, need_dx: bool):
    """(dx, dM, dS) of h = x M^T + noise path (w = sigma * E, E float32), given dh (T, R) float32; dM and dS in
    float32."""
    (t, k), r = x.shape, m.shape[0]
    flags = _kernel_flags(x, t, k, r, noise, flipout)
    bt, bk = flags["BLOCK_T"], flags["BLOCK_K"]
    dhs = _signed_rows(dh, seed) if noise and flipout else dh  # the noise path's dh, signed once for both kernels
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        grid = (triton.cdiv(t, bt), triton.cdiv(k, bk))
        _down_bwd_dx_kernel[grid](dh, dhs, m, w, dx, t, k, r, seed, **flags)
    # Enough splits over tokens to fill the GPU when K has few blocks; each split's partial is only (R, K).
    n_split = max(1, min(triton.cdiv(t, bt), 256 // triton.cdiv(k, bk)))
    dm = torch.empty(n_split, r, k, device=x.device, dtype=torch.float32)
    ds = torch.empty_like(dm) if noise else dm
    _down_bwd_dw_kernel[(triton.cdiv(k, bk), n_split)](x, dh, dhs, e, dm, ds, t, k, r, seed, **flags)
    return dx, dm.sum(0), (ds.sum(0) if noise else None)


class _FusedSampledLora(torch.autograd.Function):
    """result += s * B h, h = x M^T + ((x * r_in) (S * E)^T) * r_out, in place on ``result`` (the base output).

    Saved for the backward: x (which autograd keeps for the base layer anyway), the factors, h (tokens x r), and
    S * E and E (factor-sized); nothing per token of the noise."""

    @staticmethod
    def forward(ctx, result, x, m, s, b, scaling: float, seed: int, noise: bool, flipout: bool):
        # result (..., N) base layer output, x (T, K), m / s (R, K), b (N, R); s is m when noise is off.
        # ``result`` comes in with its own shape and is flattened here, where autograd does not see it: marking a
        # *view* dirty would make autograd rebase it on its base (CopySlices), whose backward copies the whole
        # (tokens x N) gradient two or three times.
        w, e = _scaled_noise(s, seed, x.dtype) if noise else (m, m)  # S * E and E, drawn once for every token
        h = _down_forward(x, m, w, seed, noise, flipout)  # (T, R) float32: small, kept for dB
        flat = result.view(-1, result.shape[-1])
        flat.addmm_(h.to(result.dtype), b.t().to(result.dtype), alpha=scaling)  # cuBLAS, into the base buffer
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, m, s, b, h, w, e)
        ctx.args = (scaling, seed, noise, flipout)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, m, s, b, h, w, e = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # a view for the contiguous gradients autograd passes
        scaling, seed, noise, flipout = ctx.args
        need_x, need_m, need_s, need_b = ctx.needs_input_grad[1:5]
        db = (grad.t() @ h.to(grad.dtype)).mul_(scaling).to(b.dtype) if need_b else None  # (N, R)
        dx = dm = ds = None
        if need_x or need_m or (noise and need_s):
            dh = (grad @ b.to(grad.dtype)).float().mul_(scaling)  # (T, R)
            dx, dm, ds = _down_backward(x, m, w, e, dh, seed, noise, flipout, need_x)
            dm = dm.to(m.dtype) if need_m else None
            ds = ds.to(s.dtype) if (noise and need_s) else None
        return grad_out, dx, dm, ds, db, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: the one call the tuner layer makes.
# ---------------------------------------------------------------------------------------------------------------


def triton_runtime() -> str | None:
    """How this process runs the Triton kernels: ``"compiled"`` (CUDA present, triton imported normally),
    ``"interpreter"`` (``TRITON_INTERPRET=1`` before triton's import: CPU tensors) or None (no triton, or no GPU
    without the interpreter). With CUDA present and the interpreter on, the kernels would run interpreted on CPU
    copies; that is reported as ``"interpreter"`` so a GPU check can refuse it."""
    if triton is None:
        return None
    if _interpreting():
        return "interpreter"
    return "compiled" if torch.cuda.is_available() else None


def kernel_device() -> torch.device:
    """The device the fused kernels run on here: CUDA when compiled, else the CPU (interpreter)."""
    return torch.device("cuda" if triton_runtime() == "compiled" else "cpu")


def draw_seed() -> int:
    """A Philox seed for one fused forward, from torch's default CPU generator (no device sync; reproducible under
    ``torch.manual_seed``; replayed by gradient checkpointing, which restores the CPU RNG state)."""
    return int(torch.randint(0, 2**31 - 3, (1,)).item())  # seed + 2 must stay below 2**31


def kernel_mode() -> str:
    """``PEFT_BAYES_KERNEL`` (default ``auto``), validated."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV}={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


def kernel_path(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for an input on ``x``'s device: Triton on CUDA tensors, the reference
    elsewhere, unless ``PEFT_BAYES_KERNEL`` says otherwise (``triton`` on CPU tensors runs the interpreter).

    Raises:
        RuntimeError: ``PEFT_BAYES_KERNEL=triton`` where triton cannot run these tensors.
    """
    mode = kernel_mode()
    if mode == "reference" or (mode == "auto" and (triton is None or x.device.type != "cuda")):
        return "reference"
    if triton is None:
        raise RuntimeError(f"{KERNEL_ENV}=triton but triton is not installed")
    if x.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            f"{KERNEL_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"


def uses_fused_path(
    x: torch.Tensor, rank: int, *, factor: str = "A", noise: bool = True, b_bias: torch.Tensor | None = None
) -> bool:
    """Whether ``add_sampled_lora`` runs the fused kernels for these inputs. The reference takes what they do not
    cover: a Bayesian B, a LoRA bias on B, ranks above ``MAX_RANK``, and devices ``kernel_path`` sends to it."""
    return kernel_path(x) == "triton" and b_bias is None and (not noise or factor == "A") and rank <= MAX_RANK


def add_sampled_lora(
    result: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    *,
    std: torch.Tensor | None = None,
    factor: str = "A",
    flipout: bool = True,
    eps: torch.Tensor | None = None,
    b_bias: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """``result + s * (B A x + bias)`` with the Bayesian factor sampled; the fused path updates ``result`` in place.

    Args:
        result: (..., d_out) the base layer's output.
        x: (..., d_in) the adapter's input (after LoRA dropout), in the adapter's dtype.
        a, b: (r, d_in) and (d_out, r): A and B, the Bayesian one as its posterior mean.
        scaling: LoRA's scaling s.
        std: posterior std of the Bayesian factor (same shape as it); None: the mean, no noise.
        factor: ``"A"`` (BLoB) or ``"B"``: which factor ``std`` belongs to.
        flipout: per-token signs on fresh draws.
        eps: a fixed draw E of the Bayesian factor (``posterior_sample``): W = mean + std * eps for every token.
        b_bias: LoRA's optional bias on B.
        seed: Philox seed of the fused path (default: drawn from torch's CPU generator, so ``torch.manual_seed``
            and gradient checkpointing's RNG replay apply).

    Returns:
        The updated output (``result`` itself on the fused path), in ``result``'s dtype.
    """
    if eps is not None:  # one fixed weight sample: a deterministic LoRA with that factor
        if factor == "A":
            a = a + std * eps.to(a.dtype)
        else:
            b = b + std * eps.to(b.dtype)
        std = None
    if not uses_fused_path(x, a.shape[0], factor=factor, noise=std is not None, b_bias=b_bias):
        noise = None
        if std is not None:
            tokens = x.shape[:-1]
            noise = draw_noise(tokens, tuple(std.shape), flipout, device=x.device, dtype=x.dtype)
        kw = {"a_std": std} if factor == "A" else {"b_std": std}
        return result + sampled_lora_delta(x, a, b, scaling, noise=noise, b_bias=b_bias, **kw).to(result.dtype)
    return _fused_into(result, x, a, b, std, float(scaling), draw_seed() if seed is None else seed, flipout)


def _fused_into(result, x, a, b, std, scaling: float, seed: int, flipout: bool) -> torch.Tensor:
    """The fused path of ``add_sampled_lora`` (A Bayesian or no noise, no bias, rank <= MAX_RANK)."""
    # In place into the base output, unless that is not allowed: a view under autograd (bitsandbytes' int8 matmul
    # returns one made inside its autograd Function on CUDA, and autograd forbids updating that in place) or a
    # non-contiguous tensor; those are copied once, as PEFT copies every base output.
    viewed = result._is_view() and result.requires_grad and torch.is_grad_enabled()
    out = result if result.is_contiguous() and not viewed else result.clone(memory_format=torch.contiguous_format)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_autocast_enabled(x.device.type):  # mixed precision: the kernels run in the autocast dtype, as F.linear
        cast = torch.get_autocast_dtype(x.device.type)
        x2, a, b, std = (v if v is None else v.to(cast) for v in (x2, a, b, std))
    a, b = a.contiguous(), b.contiguous()
    s = std.contiguous() if std is not None else a
    return _FusedSampledLora.apply(out, x2, a, s, b, scaling, seed, std is not None, flipout)
