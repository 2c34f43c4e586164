"""Curvature blocks against dense float64 computations: P = scale * H + delta * I built with torch.kron / torch.diag /
the matrix itself, and torch.linalg's slogdet, solve and inv as the oracles."""

from __future__ import annotations

import pytest
import torch

from peft_bayes.posterior.structures import CurvatureBlock, DenseBlock, DiagBlock, KronBlock

OUT, IN = 5, 3
KINDS = ["kron", "diag", "full"]
RTOL, ATOL = 1e-10, 1e-12


def _psd(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return x @ x.T


def _case(kind: str, seed: int = 0) -> tuple[CurvatureBlock, torch.Tensor]:
    """A block and its dense H, the latter built independently of the block's own ``to_dense``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "kron":
        G, A = _psd(OUT, 7, gen), _psd(IN, 4, gen)
        return KronBlock(G, A), torch.kron(G, A)
    if kind == "diag":
        d = 3 * torch.rand(OUT, IN, generator=gen, dtype=torch.float64)
        return DiagBlock(d), torch.diag(d.flatten())
    H = _psd(OUT * IN, 20, gen) / 4
    return DenseBlock(H), H


def _precision(H: torch.Tensor, delta, scale: float) -> torch.Tensor:
    return scale * H + delta * torch.eye(H.shape[0], dtype=H.dtype)


def _flat(block: CurvatureBlock, m: torch.Tensor) -> torch.Tensor:
    return m.reshape(*m.shape[: m.ndim - len(block.shape)], -1)


DELTAS_SCALES = [(0.3, 1.0), (torch.tensor(0.7, dtype=torch.float64), 2.5), (1e-3, 40.0)]


@pytest.mark.parametrize("kind", KINDS)
def test_shape_numel_kind_and_dense(kind):
    block, H = _case(kind)
    expected_shape = (OUT * IN,) if kind == "full" else (OUT, IN)
    assert tuple(block.shape) == expected_shape
    assert block.numel == OUT * IN
    assert block.kind == kind
    torch.testing.assert_close(block.to_dense(), H, rtol=0, atol=0)


@pytest.mark.parametrize("delta,scale", DELTAS_SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_logdet_matches_slogdet(kind, delta, scale):
    block, H = _case(kind)
    sign, expected = torch.linalg.slogdet(_precision(H, delta, scale))
    assert sign == 1
    got = block.logdet(delta, scale)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("delta,scale", DELTAS_SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_mv_and_inv_mv_match_dense(kind, delta, scale):
    block, H = _case(kind)
    P = _precision(H, delta, scale)
    gen = torch.Generator().manual_seed(1)
    single = torch.randn(block.shape, generator=gen, dtype=torch.float64)
    batch = torch.randn(2, 4, *block.shape, generator=gen, dtype=torch.float64)
    for m in (single, batch):
        flat = _flat(block, m)  # (..., n)
        got_mv, got_inv = block.mv(m, delta, scale), block.inv_mv(m, delta, scale)
        assert got_mv.shape == m.shape and got_inv.shape == m.shape
        torch.testing.assert_close(_flat(block, got_mv), flat @ P.T, rtol=RTOL, atol=ATOL)
        expected_inv = torch.linalg.solve(P, flat.reshape(-1, block.numel).T).T.reshape(flat.shape)
        torch.testing.assert_close(_flat(block, got_inv), expected_inv, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("delta,scale", DELTAS_SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_inv_quad_matches_dense(kind, delta, scale):
    block, H = _case(kind)
    P_inv = torch.linalg.inv(_precision(H, delta, scale))
    jac = torch.randn(2, 3, *block.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat = _flat(block, jac)  # (2, K=3, n)
    got = block.inv_quad(jac, delta, scale)
    assert got.shape == (2, 3, 3)
    torch.testing.assert_close(got, flat @ P_inv @ flat.mT, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got, got.mT, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_covariance_matches_inverse_precision(kind):
    block, H = _case(kind)
    delta, scale = 0.4, 1.5
    n = 40_000
    draws = block.sample(delta, scale, n=n, generator=torch.Generator().manual_seed(3))
    assert draws.shape == (n, *block.shape) and draws.dtype == torch.float64
    flat = _flat(block, draws)  # (n, numel), mean zero by construction
    cov = flat.T @ flat / n
    expected = torch.linalg.inv(_precision(H, delta, scale))
    rel = torch.linalg.matrix_norm(cov - expected) / torch.linalg.matrix_norm(expected)
    assert rel < 0.05, f"relative Frobenius error of the sample covariance {rel:.4f}"


@pytest.mark.parametrize("kind", KINDS)
def test_sample_is_reproducible_with_a_seeded_generator(kind):
    block, _ = _case(kind)
    first = block.sample(0.5, generator=torch.Generator().manual_seed(7))
    second = block.sample(0.5, generator=torch.Generator().manual_seed(7))
    other = block.sample(0.5, generator=torch.Generator().manual_seed(8))
    assert first.shape == block.shape
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_logdet_gradient_in_delta_is_trace_of_inverse(kind, scale):
    block, H = _case(kind)
    delta = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(block.logdet(delta, scale), delta)
    expected = torch.linalg.inv(_precision(H, 0.6, scale)).trace()
    torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_inv_quad_and_inv_mv_are_differentiable_in_delta(kind):
    # d/dδ (vᵀ P⁻¹ v) = -vᵀ P⁻² v.
    block, H = _case(kind)
    delta = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(block.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (grad,) = torch.autograd.grad(block.inv_quad(v[None], delta)[0, 0], delta)
    solved = torch.linalg.solve(_precision(H, 0.6, 1.0), v.flatten())
    torch.testing.assert_close(grad, -(solved @ solved), rtol=RTOL, atol=ATOL)


def _with_negative_eigenvalue(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with eigenvalues (-1e-3, 1, 2, ...) and its PSD projection (the -1e-3 set to 0)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigvals = torch.arange(n, dtype=torch.float64)
    eigvals[0] = -1e-3
    return q @ torch.diag(eigvals) @ q.T, q @ torch.diag(eigvals.clamp(min=0)) @ q.T


@pytest.mark.parametrize("kind", ["kron", "full"])
def test_negative_eigenvalues_are_clamped_to_zero(kind):
    gen = torch.Generator().manual_seed(5)
    if kind == "kron":
        G, G_psd = _with_negative_eigenvalue(OUT, gen)
        A = _psd(IN, 4, gen)
        block, H_psd = KronBlock(G, A), torch.kron(G_psd, A)
    else:
        H, H_psd = _with_negative_eigenvalue(OUT * IN, gen)
        block = DenseBlock(H)
    eigvals = block.eigenvalues()
    assert eigvals.min() == 0
    expected = torch.linalg.eigvalsh(H_psd).clamp(min=0).sort().values
    torch.testing.assert_close(eigvals.flatten().sort().values, expected, rtol=RTOL, atol=1e-12)
    # With a prior precision below the clamped magnitude the unclamped log-determinant would be NaN.
    delta = 1e-5
    torch.testing.assert_close(
        block.logdet(delta), torch.linalg.slogdet(_precision(H_psd, delta, 1.0))[1], rtol=RTOL, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenpairs_are_stored_in_the_factor_dtype(dtype):
    gen = torch.Generator().manual_seed(6)
    block = KronBlock(_psd(OUT, 7, gen).to(dtype), _psd(IN, 4, gen).to(dtype)).eigendecompose()
    assert all(t.dtype == dtype for t in block._eig)
    assert block.eigenvalues().dtype == dtype
    assert block.sample(0.5, n=2).dtype == dtype
    full = DenseBlock(_psd(OUT * IN, 20, gen).to(dtype)).eigendecompose()
    assert all(t.dtype == dtype for t in full._eig)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    block, _ = _case(kind)
    block.eigendecompose()
    state = block.state_dict()
    assert set(state) == set(type(block)._factor_names)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded = type(block).from_state_dict(state)
    assert type(loaded) is type(block) and tuple(loaded.shape) == tuple(block.shape)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name])
    assert torch.equal(loaded.logdet(0.3, 2.0), block.logdet(0.3, 2.0))
    with pytest.raises(KeyError, match="lacks"):
        type(block).from_state_dict({})


def test_rank_deficient_kron_is_invertible_with_a_prior():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(IN, 1, generator=gen, dtype=torch.float64)
    g = torch.randn(OUT, 1, generator=gen, dtype=torch.float64)
    G, A = g @ g.T, x @ x.T  # rank 1 each: H has rank 1 of 15
    block = KronBlock(G, A)
    assert (block.eigenvalues() > 1e-10).sum() == 1
    delta = 0.5
    P = _precision(torch.kron(G, A), delta, 2.0)
    torch.testing.assert_close(block.logdet(delta, 2.0), torch.linalg.slogdet(P)[1], rtol=RTOL, atol=ATOL)
    m = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    back = block.mv(block.inv_mv(m, delta, 2.0), delta, 2.0)
    torch.testing.assert_close(back, m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        block.inv_mv(m, delta, 2.0).flatten(), torch.linalg.solve(P, m.flatten()), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("kind", KINDS)
def test_add_sums_the_statistics_without_touching_the_originals(kind):
    block, _ = _case(kind, seed=0)
    other, _ = _case(kind, seed=1)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    aliases = block.state_dict()
    block.eigendecompose()
    assert block.add_(other) is block
    for name, value in block.state_dict().items():
        torch.testing.assert_close(value, before[name] + other.state_dict()[name], rtol=0, atol=0)
        assert torch.equal(aliases[name], before[name]), "add_ mutated a tensor the caller still holds"
    if kind == "kron":  # (G + G') ⊗ (A + A'), not the sum of the two Kronecker products
        expected = torch.kron(block.G, block.A)
    else:
        expected = _case(kind, 0)[1] + _case(kind, 1)[1]
    torch.testing.assert_close(block.to_dense(), expected, rtol=RTOL, atol=ATOL)
    # The eigendecomposition cached before the sum must not survive it.
    sign, expected_logdet = torch.linalg.slogdet(_precision(expected, 0.3, 1.0))
    torch.testing.assert_close(block.logdet(0.3), expected_logdet, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("decompose_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_scaled(kind, decompose_first):
    block, H = _case(kind)
    if decompose_first:
        block.eigendecompose()
    scaled = block.scaled(2.5)
    assert type(scaled) is type(block)
    torch.testing.assert_close(scaled.to_dense(), 2.5 * H, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(block.to_dense(), H, rtol=0, atol=0)
    expected = torch.linalg.slogdet(_precision(2.5 * H, 0.3, 1.0))[1]
    torch.testing.assert_close(scaled.logdet(0.3), expected, rtol=RTOL, atol=ATOL)


def test_bad_inputs_name_what_was_expected():
    block, _ = _case("kron")
    with pytest.raises(ValueError, match=r"m must have shape \(\.\.\., 5, 3\)"):
        block.inv_mv(torch.zeros(3, 5, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"jac must have shape \(\.\.\., K, 5, 3\)"):
        block.inv_quad(torch.zeros(5, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="scale must be a positive"):
        block.logdet(0.1, scale=0.0)
    with pytest.raises(ValueError, match="delta"):
        block.logdet(-0.1)
    with pytest.raises(ValueError, match="G must be a non-empty square"):
        KronBlock(torch.zeros(2, 3), torch.eye(3))
    with pytest.raises(ValueError, match="H must be a non-empty square"):
        DenseBlock(torch.zeros(4))
    with pytest.raises(TypeError, match="DiagBlock to a KronBlock"):
        block.add_(_case("diag")[0])
    with pytest.raises(ValueError, match="shapes"):
        block.add_(KronBlock(torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)))
