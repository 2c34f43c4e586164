"""The sampled low-rank update of a Bayesian LoRA layer (BLoB, Wang et al. 2024), pure-PyTorch reference.

One LoRA factor carries a diagonal Gaussian posterior ``W = M + sigma * E``, ``E ~ N(0, 1)``; the other is
deterministic. BLoB makes A (r x d_in) Bayesian; B (d_out x r) may be chosen instead. The layer adds
``s * B A x`` to the frozen layer's output. With *flipout* (Wen et al. 2018) one draw of E per forward pass serves
every token: token t uses ``W_t = M + (sigma * E) * (r_out[t] r_in[t]^T)`` with Rademacher signs ``r_in[t]``
(the factor's input width) and ``r_out[t]`` (its output width). That has exactly the marginal distribution of an
independent draw per token, but costs two elementwise products instead of a weight matrix per token. For A:

    h = x M^T + ((x * r_in) (sigma * E)^T) * r_out          (..., r)
    delta = s * h B^T                                        (..., d_out)

``sampled_lora_delta`` is the call the layer makes. This file holds its reference implementation, which is also
the CPU path and the test oracle for a fused Triton kernel that can take its place on GPUs behind the same call.
Nothing here imports more than torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
