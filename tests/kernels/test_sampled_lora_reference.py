"""The pure-PyTorch sampled LoRA update (``peft_bayes.kernels.sampled_lora``) against independent computations.

- Forward and every gradient against a dense float64 per-token computation that builds each token's weight
  ``W_t = M + (sigma * E) * outer(r_out[t], r_in[t])`` explicitly (and ``gradcheck``).
- The noise statistics against their closed forms, with bounds of a few standard errors: over independent draws
  the delta has mean 0 and variance ``s^2 sum_j B_kj^2 sum_i sigma_ji^2 x_i^2`` (factor A); with flipout and one
  fixed E, tokens are uncorrelated and each has variance ``sum_i sigma_ji^2 E_ji^2 x_i^2``.
- ``draw_noise``: shapes, dtypes, +-1 signs, None signs without flipout, reproducible with a generator.
"""

from __future__ import annotations

import pytest
import torch

from peft_bayes.kernels.sampled_lora import LoraNoise, draw_noise, flipout_linear, sampled_lora_delta

# (token dims, d_in, r, d_out): odd sizes, a rank-1 case, 1-D and 3-D token layouts.
SHAPES = [((2, 3), 7, 3, 5), ((5,), 11, 1, 4), ((1, 2, 3), 4, 6, 9)]


def _params(tokens, d_in, r, d_out, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, d_in, generator=g, dtype=dtype)
    a = torch.randn(r, d_in, generator=g, dtype=dtype)
    b = torch.randn(d_out, r, generator=g, dtype=dtype)
    bias = torch.randn(d_out, generator=g, dtype=dtype)
    return x, a, b, bias, g


def _dense(x, a, b, scaling, factor, std, noise, bias):
    """Builds every token's sampled weight explicitly and multiplies token by token (float64)."""
    tokens = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1])
    outs = []
    mean = a if factor == "A" else b
    for t in range(xs.shape[0]):
        w = mean
        if noise is not None:
            if noise.sign_in is None:
                w = mean + std * noise.eps
            else:
                r_in = noise.sign_in.reshape(-1, mean.shape[1])[t]
                r_out = noise.sign_out.reshape(-1, mean.shape[0])[t]
                w = mean + (std * noise.eps) * torch.outer(r_out, r_in)
        wa, wb = (w, b) if factor == "A" else (a, w)
        y = wb @ (wa @ xs[t])
        if bias is not None:
            y = y + bias
        outs.append(scaling * y)
    return torch.stack(outs).reshape(*tokens, -1)


def _call(x, a, b, scaling, factor, std, noise, bias):
    kw = {"a_std": std} if factor == "A" else {"b_std": std}
    return sampled_lora_delta(x, a, b, scaling, noise=noise, b_bias=bias, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("flipout", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_grads_match_dense_per_token(shape, factor, flipout, with_bias):
    tokens, d_in, r, d_out = shape
    x, a, b, bias, g = _params(tokens, d_in, r, d_out)
    bias = bias if with_bias else None
    rows_cols = a.shape if factor == "A" else b.shape
    std = torch.rand(rows_cols, generator=g, dtype=torch.float64) + 0.1
    noise = draw_noise(tokens, tuple(rows_cols), flipout, dtype=torch.float64, generator=g)
    scaling = 0.75

    leaves = [t.clone().requires_grad_() for t in (x, a, b, std)]
    out = _call(*leaves[:3], scaling, factor, leaves[3], noise, bias)
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, b, std)]
    ref = _dense(*ref_leaves[:3], scaling, factor, ref_leaves[3], noise, bias)
    assert out.shape == (*tokens, d_out) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # The noise part is not trivially zero (else the comparison would not test it).
    mean_out = sampled_lora_delta(x, a, b, scaling, b_bias=bias)
    assert (out - mean_out).abs().max() > 1e-2

    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    for name, got, want in zip(("x", "a", "b", "std"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"d/d{n}: {m}")

    # float32 inputs: same result to float32 accuracy.
    out32 = _call(
        x.float(),
        a.float(),
        b.float(),
        scaling,
        factor,
        std.float(),
        _cast(noise, torch.float32),
        None if bias is None else bias.float(),
    )
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def _cast(noise: LoraNoise, dtype) -> LoraNoise:
    conv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return LoraNoise(conv(noise.eps), conv(noise.sign_in), conv(noise.sign_out))


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("flipout", [True, False])
def test_gradcheck(factor, flipout):
    x, a, b, bias, g = _params((2, 3), 5, 2, 3, seed=1)
    std = torch.rand(a.shape if factor == "A" else b.shape, generator=g, dtype=torch.float64) + 0.1
    noise = draw_noise((2, 3), tuple(std.shape), flipout, dtype=torch.float64, generator=g)
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, b, std, bias))

    def fn(x, a, b, std, bias):
        return _call(x, a, b, 1.3, factor, std, noise, bias)

    assert torch.autograd.gradcheck(fn, inputs)


def test_mean_without_noise_and_argument_check():
    x, a, b, bias, g = _params((4,), 6, 3, 5)
    torch.testing.assert_close(sampled_lora_delta(x, a, b, 2.0, b_bias=bias), 2.0 * (x @ a.T @ b.T + bias))
    # A std without noise is ignored: the mean.
    std = torch.ones_like(a)
    torch.testing.assert_close(sampled_lora_delta(x, a, b, 2.0, a_std=std), 2.0 * (x @ a.T @ b.T))
    noise = draw_noise((4,), tuple(a.shape), dtype=torch.float64, generator=g)
    with pytest.raises(ValueError):
        sampled_lora_delta(x, a, b, 1.0, noise=noise)
    with pytest.raises(ValueError):
        sampled_lora_delta(x, a, b, 1.0, noise=noise, a_std=std, b_std=torch.ones_like(b))


def _moment_bounds(samples: torch.Tensor, n_sigma: float = 5.0):
    """Per-entry sample mean / variance of ``samples`` (n, k) and their standard errors."""
    n = samples.shape[0]
    mean = samples.mean(0)
    centred = samples - mean
    var = centred.pow(2).mean(0)
    m4 = centred.pow(4).mean(0)
    return mean, n_sigma * (var / n).sqrt(), var, n_sigma * ((m4 - var**2) / n).sqrt()


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("flipout", [True, False])
def test_noise_moments_over_independent_draws(factor, flipout):
    """Over independent draws (E and signs), delta - mean has mean 0 and the closed-form variance."""
    d_in, r, d_out, scaling = 6, 3, 4, 0.5
    x, a, b, _, g = _params((1,), d_in, r, d_out, seed=2)
    shape = a.shape if factor == "A" else b.shape
    std = torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 + 0.05
    kw = {"a_std": std} if factor == "A" else {"b_std": std}
    mean_out = sampled_lora_delta(x, a, b, scaling)[0]
    n = 20000
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack(
        [
            sampled_lora_delta(
                x,
                a,
                b,
                scaling,
                noise=draw_noise((1,), tuple(shape), flipout, dtype=torch.float64, generator=gen),
                **kw,
            )[0]
            for _ in range(n)
        ]
    )
    noise = draws - mean_out
    if factor == "A":  # Var h_j = sum_i sigma_ji^2 x_i^2, h_j independent; delta = s B h
        var_h = (std**2 * x[0] ** 2).sum(1)
        expected = scaling**2 * (b**2 * var_h).sum(1)
    else:  # Var delta_k = s^2 sum_j sigma_kj^2 (A x)_j^2
        expected = scaling**2 * (std**2 * (a @ x[0]) ** 2).sum(1)
    mean, mean_tol, var, var_tol = _moment_bounds(noise)
    assert (mean.abs() <= mean_tol).all(), (mean, mean_tol)
    assert ((var - expected).abs() <= var_tol).all(), (var, expected, var_tol)
    assert (var_tol / expected).max() < 0.1  # the bound is tight enough to mean something


def test_flipout_tokens_given_one_draw():
    """One E for 20000 tokens: each token's noise has mean 0 and variance sum_i sigma_ji^2 E_ji^2 v_i^2 over the
    signs, and neighbouring tokens are uncorrelated (what flipout is for)."""
    d, rows, n = 5, 4, 20000
    g = torch.Generator().manual_seed(4)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    mean = torch.randn(rows, d, generator=g, dtype=torch.float64)
    std = torch.rand(rows, d, generator=g, dtype=torch.float64) + 0.2
    noise = draw_noise((n,), (rows, d), True, dtype=torch.float64, generator=g)
    # flipout_linear is what either factor goes through (A on x, B on h = A x); the same input on every token.
    out = flipout_linear(v.expand(n, d), mean, std, noise) - v @ mean.T
    expected = (std**2 * noise.eps**2 * v**2).sum(1)
    m, m_tol, var, var_tol = _moment_bounds(out)
    assert (m.abs() <= m_tol).all(), (m, m_tol)
    assert ((var - expected).abs() <= var_tol).all(), (var, expected, var_tol)
    # Without flipout every token would see the same noise; with it, adjacent tokens are uncorrelated.
    prod = out[:-1:2] * out[1::2]
    pm, pm_tol, _, _ = _moment_bounds(prod)
    assert (pm.abs() <= pm_tol).all(), (pm, pm_tol)
    same = draw_noise((n,), (rows, d), False, dtype=torch.float64, generator=g)
    shared = flipout_linear(v.expand(n, d), mean, std, same)
    assert torch.equal(shared, shared[:1].expand_as(shared))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_draw_noise_shapes_and_signs(dtype):
    noise = draw_noise((3, 7), (4, 9), True, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert noise.eps.shape == (4, 9) and noise.sign_in.shape == (3, 7, 9) and noise.sign_out.shape == (3, 7, 4)
    for t in (noise.eps, noise.sign_in, noise.sign_out):
        assert t.dtype == dtype and t.device.type == "cpu"
    for s in (noise.sign_in, noise.sign_out):
        assert set(s.unique().tolist()) == {-1.0, 1.0}
    plain = draw_noise((3, 7), (4, 9), False, dtype=dtype)
    assert plain.sign_in is None and plain.sign_out is None and plain.eps.shape == (4, 9)
    # Reproducible with a generator; different with another seed.
    n1 = draw_noise((5,), (2, 3), generator=torch.Generator().manual_seed(7))
    n2 = draw_noise((5,), (2, 3), generator=torch.Generator().manual_seed(7))
    n3 = draw_noise((5,), (2, 3), generator=torch.Generator().manual_seed(8))
    assert (
        torch.equal(n1.eps, n2.eps) and torch.equal(n1.sign_in, n2.sign_in) and torch.equal(n1.sign_out, n2.sign_out)
    )
    assert not torch.equal(n1.eps, n3.eps)


def test_draw_noise_distribution():
    noise = draw_noise((40000,), (100, 100), True, generator=torch.Generator().manual_seed(0))
    eps = noise.eps.double().flatten()
    n = eps.numel()
    assert abs(eps.mean()) < 5 / n**0.5 and abs(eps.var() - 1) < 5 * (2 / n) ** 0.5
    for s in (noise.sign_in, noise.sign_out):
        assert abs(s.double().mean()) < 5 / s.numel() ** 0.5
