"""Low-rank Kronecker factors (``posterior.lowrank``) against dense float64 computations.

- ``StreamingEigen`` against ``torch.linalg.eigh`` of the dense weighted sum Σ Xᵀ diag(w) X: exact (to round-off)
  while the sum's rank fits in rank + oversample columns, and for a full-rank sum with a spectral gap the top
  eigenvalues to 1e-8 relative; merged streams against one stream over all batches.
- ``EigenFactor`` against the dense U diag(λ) Uᵀ + ρ (I - U Uᵀ) written out here.
- ``LowRankKronBlock`` against the dense P = scale * kron(G_approx, A_approx) + delta * I with ``slogdet``, ``solve``
  and ``inv``, for low-rank, full (k = dim) and mixed factors; with both factors full, against ``KronBlock``.
- ``factor_memory`` for LoRA on LLaMA-7B's q / v.
"""

from __future__ import annotations

import pytest
import torch

from peft_bayes.posterior.lowrank import (
    EigenFactor,
    LowRankKronBlock,
    StreamingEigen,
    factor_memory,
    llama7b_lora_shapes,
)
from peft_bayes.posterior.structures import KronBlock

F64 = torch.float64
RTOL, ATOL = 1e-10, 1e-12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(n: int, d: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """n rows in a random rank-``rank`` subspace of R^d, so Σ xxᵀ has rank ``rank``."""
    return torch.randn(n, rank, generator=gen, dtype=F64) @ torch.randn(rank, d, generator=gen, dtype=F64)


def _gapped_rows(n: int, d: int, top: list[float], tail: float, gen: torch.Generator) -> torch.Tensor:
    """Rows with covariance Q diag(top, tail * 0.8^j) Qᵀ: a full-rank spectrum with a gap after len(top)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    spec = torch.cat([torch.tensor(top, dtype=F64), tail * 0.8 ** torch.arange(d - len(top), dtype=F64)])
    return torch.randn(n, d, generator=gen, dtype=F64) * spec.sqrt() @ Q.T


def _stream(X: torch.Tensor, w: torch.Tensor | None, rank: int, oversample: int, batch: int = 5, chunk: int = 3):
    stream = StreamingEigen(X.shape[1], rank, oversample=oversample, chunk_size=chunk)
    for i in range(0, X.shape[0], batch):
        stream.update(X[i : i + batch], None if w is None else w[i : i + batch])
    return stream


def _dense_factor(U: torch.Tensor, lam: torch.Tensor, rho, dim: int) -> torch.Tensor:
    """U diag(λ) Uᵀ + ρ (I - U Uᵀ), written out independently of EigenFactor.to_dense."""
    proj = U @ U.T
    return U @ torch.diag(lam) @ U.T + rho * (torch.eye(dim, dtype=U.dtype) - proj)


def _top_eigh(F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Descending eigenvalues (all), and the top-k eigenvalues and eigenvectors of a dense F."""
    ev, V = torch.linalg.eigh(F)
    ev, V = ev.flip(0), V.flip(1)
    return ev, ev[:k], V[:, :k]


# ---- StreamingEigen --------------------------------------------------------------------------------------------
def test_stream_is_exact_when_the_rank_fits():
    d, true_rank, rank, oversample = 20, 6, 4, 3  # width 7 >= 6: every truncation drops only zero eigenvalues
    gen = _gen(0)
    X, w = _rows(60, d, true_rank, gen), torch.rand(60, generator=gen, dtype=F64)
    F = X.T @ (w[:, None] * X)
    stream = _stream(X, w, rank, oversample)
    ev, top, V = _top_eigh(F, rank)
    factor = stream.finalize()
    assert factor.k == rank and factor.dim == d and factor.dtype == F64
    torch.testing.assert_close(factor.lam, top, rtol=1e-10, atol=0)
    torch.testing.assert_close((factor.U.T @ V).abs(), torch.eye(rank, dtype=F64), rtol=0, atol=1e-8)  # same vectors
    torch.testing.assert_close(stream.trace, F.trace(), rtol=1e-13, atol=0)
    # ρ is the mean of the discarded spectrum (here 2 nonzero eigenvalues spread over d - k = 16 directions).
    torch.testing.assert_close(factor.rho, ev[rank:].sum() / (d - rank), rtol=1e-9, atol=1e-12)
    assert stream.captured_mass == pytest.approx(float(top.sum() / F.trace()), rel=1e-12)
    # With rank >= the true rank the factor is F itself.
    full = _stream(X, w, true_rank, 1).finalize()
    torch.testing.assert_close(full.to_dense(), F, rtol=0, atol=1e-10 * float(F.abs().max()))
    assert _stream(X, w, true_rank, 1).captured_mass == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("batch, chunk", [(5, 3), (60, 1024), (25, 16)])  # QR route, Gram route, both mixed
def test_stream_routes_agree_with_the_dense_sum(batch, chunk):
    """A batch wide against the factor goes through the (dim, dim) Gram, a narrow one through the chunked QR; both
    give the dense sum's eigenpairs (rank fits) and, for a full-rank sum, its top eigenvalues."""
    d, gen = 20, _gen(5)
    X, w = _rows(60, d, 6, gen), torch.rand(60, generator=gen, dtype=F64)
    F = X.T @ (w[:, None] * X)
    stream = _stream(X, w, 6, 1, batch=batch, chunk=chunk)
    torch.testing.assert_close(stream.finalize().to_dense(), F, rtol=0, atol=1e-10 * float(F.abs().max()))
    Y = _gapped_rows(300, d, [30.0, 10.0], 0.01, gen)
    G = Y.T @ Y
    _, top, _ = _top_eigh(G, 2)
    lam = _stream(Y, None, 2, 4, batch=batch, chunk=chunk).finalize().lam
    torch.testing.assert_close(lam, top, rtol=1e-6, atol=0)


def test_stream_top_eigenvalues_of_a_gapped_full_rank_sum():
    """Full rank: the truncations discard real spectrum. With a gap λ_{k+1} / λ_k ~ 1e-3 the top-k eigenvalues come
    out to 1e-8 relative with oversampling (measured ~2e-9 at oversample 6), and oversampling helps by > 10x."""
    d, rank = 30, 4
    gen = _gen(1)
    X, w = _gapped_rows(600, d, [40.0, 20.0, 10.0, 5.0], 0.005, gen), torch.rand(600, generator=gen, dtype=F64)
    F = X.T @ (w[:, None] * X)
    ev, top, V = _top_eigh(F, rank)
    assert ev[rank] / ev[rank - 1] < 2e-3  # the gap the tolerance relies on

    def rel_error(oversample: int) -> float:
        return float(((_stream(X, w, rank, oversample, batch=13, chunk=7).finalize().lam - top) / top).abs().max())

    assert rel_error(6) < 1e-8
    assert rel_error(6) * 10 < rel_error(0)
    stream = _stream(X, w, rank, 6, batch=13, chunk=7)
    factor = stream.finalize()
    proj_err = torch.linalg.matrix_norm(factor.U @ factor.U.T - V @ V.T, ord=2)
    assert proj_err < 1e-4, f"top-{rank} subspace off by {proj_err:.2e}"
    torch.testing.assert_close(stream.trace, F.trace(), rtol=1e-13, atol=0)
    torch.testing.assert_close(factor.rho, ev[rank:].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(factor.trace, F.trace(), rtol=1e-13, atol=0)  # ρ keeps the trace
    assert stream.captured_mass == pytest.approx(float(top.sum() / F.trace()), rel=1e-8)
    assert 0.99 < stream.captured_mass < 1.0


def test_stream_float32_input_unit_weights_and_one_chunk():
    gen = _gen(2)
    X = _rows(40, 9, 3, gen)
    ref = _stream(X, torch.ones(40, dtype=F64), 2, 2).finalize()
    for got, tol in (
        (_stream(X.float(), None, 2, 2).finalize(), 1e-6),  # float32 rows: the inputs themselves are rounded
        (StreamingEigen(9, 2, oversample=2).update(X).finalize(), 1e-12),  # all rows in one update and one chunk
    ):
        assert got.dtype == F64
        torch.testing.assert_close(got.to_dense(), ref.to_dense(), rtol=0, atol=tol * float(ref.lam[0]))
    assert StreamingEigen(9, 2).finalize(dtype=torch.float32).dtype == torch.float32


def test_stream_bad_input():
    stream = StreamingEigen(5, 2)
    with pytest.raises(ValueError, match=r"X must have shape \(n, 5\)"):
        stream.update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        stream.update(torch.zeros(3, 5), torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        stream.update(torch.zeros(3, 5), -torch.ones(3))
    with pytest.raises(ValueError, match="rank >= 1"):
        StreamingEigen(5, 0)
    with pytest.raises(ValueError, match="dims 6 and 5"):
        stream.add_(StreamingEigen(6, 2))
    empty = stream.finalize()  # nothing added: a zero factor with no eigenpairs
    assert empty.k == 0 and float(empty.rho) == 0 and stream.captured_mass == 1.0


def test_merging_streams_equals_one_stream():
    d, rank, oversample = 16, 3, 5  # two rank-3 halves: their sum has rank 6 <= width 8, so merging is exact
    gen = _gen(3)
    X = torch.cat([_rows(30, d, 3, gen), _rows(30, d, 3, gen)])
    w = torch.rand(60, generator=gen, dtype=F64)
    whole = _stream(X, w, rank, oversample).finalize()
    first, second = _stream(X[:30], w[:30], rank, oversample), _stream(X[30:], w[30:], rank, oversample)
    states = [first.state_dict(), second.state_dict()]
    assert states[0]["root"].shape == (d, rank + oversample)
    merged_new = first.merge(second)
    merged_states = StreamingEigen.from_states(states)
    merged_in_place = first.add_(second)
    F = X.T @ (w[:, None] * X)
    for merged in (merged_new, merged_states, merged_in_place):
        got = merged.finalize()
        torch.testing.assert_close(got.lam, whole.lam, rtol=1e-10, atol=0)
        torch.testing.assert_close(got.to_dense(), whole.to_dense(), rtol=0, atol=1e-10 * float(whole.lam[0]))
        torch.testing.assert_close(merged.trace, F.trace(), rtol=1e-13, atol=0)
    # A padded state (fewer rows seen than its width) merges the same.
    few = _stream(X[:2], w[:2], rank, oversample)
    assert few.state_dict()["root"].shape == (d, rank + oversample)
    torch.testing.assert_close(
        StreamingEigen.from_states([few.state_dict()]).finalize().to_dense(), few.finalize().to_dense()
    )


# ---- EigenFactor -----------------------------------------------------------------------------------------------
def _psd(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, rank, generator=gen, dtype=F64)
    return x @ x.T


@pytest.mark.parametrize("k", [0, 3, 7])
def test_eigen_factor_dense_matmul_and_state(k):
    d = 7
    F = _psd(d, 10, _gen(4))
    ev, top, V = _top_eigh(F, k)
    factor = EigenFactor.from_dense(F, rank=k)
    rho = ev[k:].mean() if k < d else 0.0
    expected = _dense_factor(V, top, rho, d)
    torch.testing.assert_close(factor.to_dense(), expected, rtol=RTOL, atol=ATOL)
    if k == d:
        torch.testing.assert_close(factor.to_dense(), F, rtol=RTOL, atol=1e-12 * float(ev[0]))
    dense_ev = torch.linalg.eigvalsh(factor.to_dense()).flip(0)  # λ then ρ (d - k times), up to ordering
    torch.testing.assert_close(
        dense_ev, torch.cat([top, torch.full((d - k,), float(rho), dtype=F64)]).sort()[0].flip(0)
    )
    torch.testing.assert_close(factor.trace, F.trace(), rtol=1e-12, atol=0)
    assert factor.numel_stored == d * k + k + 1 and factor.is_full == (k == d)
    m = torch.randn(2, d, 4, generator=_gen(5), dtype=F64)
    torch.testing.assert_close(factor.matmul(m), expected @ m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(factor.matmul(m.mT, axis=-1), m.mT @ expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(factor.matmul(m, axis=1), expected @ m, rtol=RTOL, atol=ATOL)
    back = EigenFactor.from_state_dict(factor.state_dict())
    assert torch.equal(back.to_dense(), factor.to_dense())
    torch.testing.assert_close(factor.scaled(2.5).to_dense(), 2.5 * expected, rtol=RTOL, atol=ATOL)


def test_eigen_factor_sum_is_the_truncated_dense_sum():
    d = 9
    gen = _gen(6)
    F1, F2 = _psd(d, 12, gen), _psd(d, 12, gen)
    low1, low2, full2 = EigenFactor.from_dense(F1, 3), EigenFactor.from_dense(F2, 2), EigenFactor.from_dense(F2)
    got = low1.add(low2)  # rank max(3, 2) = 3 of (the two approximations' sum)
    expected = EigenFactor.from_dense(low1.to_dense() + low2.to_dense(), 3)
    assert got.k == 3
    torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.trace, F1.trace() + F2.trace(), rtol=1e-12, atol=0)
    exact = low1.add(full2)  # a full factor makes the sum full and exact
    assert exact.is_full
    torch.testing.assert_close(exact.to_dense(), low1.to_dense() + F2, rtol=1e-10, atol=1e-10)


def test_eigen_factor_bad_input():
    with pytest.raises(ValueError, match=r"U must have shape \(dim, k\)"):
        EigenFactor(torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="lam must have shape"):
        EigenFactor(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="dim=5"):
        EigenFactor(torch.zeros(4, 2), torch.zeros(2), dim=5)
    with pytest.raises(ValueError, match="along axis"):
        EigenFactor(torch.zeros(4, 2), torch.zeros(2)).matmul(torch.zeros(3, 3))
    with pytest.raises(KeyError, match="rho"):
        EigenFactor.from_state_dict({"U": torch.zeros(4, 2), "lam": torch.zeros(2)})


# ---- LowRankKronBlock ------------------------------------------------------------------------------------------
OUT, IN = 7, 5
# (rank of G, rank of A): low-rank both, mixed, full both, and a pure scalar factor (k = 0).
RANKS = [(3, 2), (OUT, 2), (3, IN), (OUT, IN), (0, 2)]
DELTAS_SCALES = [(0.3, 1.0), (torch.tensor(0.7, dtype=F64), 2.5), (1e-3, 40.0)]


def _block(ranks: tuple[int, int], seed: int = 0) -> tuple[LowRankKronBlock, torch.Tensor]:
    """A block and its dense H = kron(G_approx, A_approx), the approximations written out by ``_dense_factor``."""
    gen = _gen(seed)
    factors, dense = [], []
    for dim, k in zip((OUT, IN), ranks):
        F = _psd(dim, dim + 3, gen)
        ev, top, V = _top_eigh(F, k)
        rho = ev[k:].mean() if k < dim else ev.new_zeros(())
        factors.append(EigenFactor(V, top, rho))
        dense.append(_dense_factor(V, top, rho, dim))
    return LowRankKronBlock(*factors), torch.kron(*dense)


def _precision(H: torch.Tensor, delta, scale: float) -> torch.Tensor:
    return scale * H + delta * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.mark.parametrize("delta,scale", DELTAS_SCALES)
@pytest.mark.parametrize("ranks", RANKS)
def test_logdet_mv_inv_mv_match_dense(ranks, delta, scale):
    block, H = _block(ranks)
    assert block.kind == "kron_lowrank" and tuple(block.shape) == (OUT, IN) and block.numel == OUT * IN
    torch.testing.assert_close(block.to_dense(), H, rtol=RTOL, atol=ATOL)
    P = _precision(H, delta, scale)
    sign, expected = torch.linalg.slogdet(P)
    assert sign == 1
    got = block.logdet(delta, scale)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    gen = _gen(1)
    for m in (torch.randn(OUT, IN, generator=gen, dtype=F64), torch.randn(2, 3, OUT, IN, generator=gen, dtype=F64)):
        flat = m.reshape(-1, OUT * IN)
        got_mv, got_inv = block.mv(m, delta, scale), block.inv_mv(m, delta, scale)
        assert got_mv.shape == m.shape and got_inv.shape == m.shape
        torch.testing.assert_close(got_mv.reshape(-1, OUT * IN), flat @ P.T, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(
            got_inv.reshape(-1, OUT * IN), torch.linalg.solve(P, flat.T).T, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("delta,scale", DELTAS_SCALES)
@pytest.mark.parametrize("ranks", RANKS)
def test_inv_quad_matches_dense(ranks, delta, scale):
    block, H = _block(ranks)
    P_inv = torch.linalg.inv(_precision(H, delta, scale))
    jac = torch.randn(2, 3, OUT, IN, generator=_gen(2), dtype=F64)
    flat = jac.reshape(2, 3, -1)
    got = block.inv_quad(jac, delta, scale)
    assert got.shape == (2, 3, 3)
    torch.testing.assert_close(got, flat @ P_inv @ flat.mT, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got, got.mT, rtol=0, atol=0)


@pytest.mark.parametrize("ranks", RANKS)
def test_logdet_gradient_in_delta_is_the_trace_of_the_covariance(ranks):
    block, H = _block(ranks)
    delta = torch.tensor(0.2, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(block.logdet(delta, 3.0), delta)
    torch.testing.assert_close(grad, torch.linalg.inv(_precision(H, 0.2, 3.0)).trace(), rtol=RTOL, atol=ATOL)
    # inv_quad and sample are differentiable in delta too (no in-place breaks the graph).
    jac = torch.randn(2, OUT, IN, generator=_gen(3), dtype=F64)
    assert torch.autograd.grad(block.inv_quad(jac, delta).sum(), delta)[0].isfinite()
    assert torch.autograd.grad(block.sample(delta, generator=_gen(3)).sum(), delta)[0].isfinite()


@pytest.mark.parametrize("ranks", [(3, 2), (OUT, 2), (0, 2)])
def test_sample_covariance_matches_inverse_precision(ranks):
    block, H = _block(ranks)
    delta, scale, n = 0.4, 1.5, 40_000
    draws = block.sample(delta, scale, n=n, generator=_gen(4))
    assert draws.shape == (n, OUT, IN) and draws.dtype == F64
    flat = draws.reshape(n, -1)
    cov = flat.T @ flat / n
    expected = torch.linalg.inv(_precision(H, delta, scale))
    rel = torch.linalg.matrix_norm(cov - expected) / torch.linalg.matrix_norm(expected)
    assert rel < 0.05, f"relative Frobenius error of the sample covariance {rel:.4f}"
    assert torch.equal(block.sample(delta, generator=_gen(5)), block.sample(delta, generator=_gen(5)))
    assert block.sample(delta).shape == (OUT, IN)


def test_full_factors_equal_kron_block():
    gen = _gen(7)
    G, A = _psd(OUT, 9, gen), _psd(IN, 8, gen)
    low = LowRankKronBlock(EigenFactor.from_dense(G), EigenFactor.from_dense(A))
    kron = KronBlock(G, A)
    delta, scale = torch.tensor(0.05, dtype=F64), 2.0
    m = torch.randn(4, OUT, IN, generator=gen, dtype=F64)
    torch.testing.assert_close(low.logdet(delta, scale), kron.logdet(delta, scale), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(low.inv_mv(m, delta, scale), kron.inv_mv(m, delta, scale), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(low.mv(m, delta, scale), kron.mv(m, delta, scale), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(low.inv_quad(m, delta, scale), kron.inv_quad(m, delta, scale), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(low.eigenvalues().flatten().sort()[0], kron.eigenvalues().flatten().sort()[0])


def test_state_dict_scaled_and_add():
    block, H = _block((3, 2))
    state = block.state_dict()
    assert sorted(state) == ["A.U", "A.lam", "A.rho", "G.U", "G.lam", "G.rho"]
    back = LowRankKronBlock.from_state_dict(state)
    m = torch.randn(OUT, IN, generator=_gen(8), dtype=F64)
    assert torch.equal(back.inv_mv(m, 0.3, 2.0), block.inv_mv(m, 0.3, 2.0))
    torch.testing.assert_close(block.scaled(3.0).to_dense(), 3.0 * H, rtol=RTOL, atol=ATOL)
    other, _ = _block((2, 2), seed=1)
    G_sum, A_sum = block.G.add(other.G), block.A.add(other.A)
    block.add_(other)
    torch.testing.assert_close(block.to_dense(), torch.kron(G_sum.to_dense(), A_sum.to_dense()), rtol=RTOL, atol=ATOL)
    # Full factors add exactly, as KronBlock sums its statistics.
    full, full_other = _block((OUT, IN), seed=2)[0], _block((OUT, IN), seed=3)[0]
    expected = torch.kron(full.G.to_dense() + full_other.G.to_dense(), full.A.to_dense() + full_other.A.to_dense())
    torch.testing.assert_close(full.add_(full_other).to_dense(), expected, rtol=RTOL, atol=1e-10)


def test_block_bad_input():
    block, _ = _block((3, 2))
    with pytest.raises(KeyError, match="G.rho"):
        LowRankKronBlock.from_state_dict({k: v for k, v in block.state_dict().items() if k != "G.rho"})
    with pytest.raises(TypeError, match="cannot add a KronBlock"):
        block.add_(KronBlock(torch.eye(OUT, dtype=F64), torch.eye(IN, dtype=F64)))
    with pytest.raises(TypeError, match="must be EigenFactor"):
        LowRankKronBlock(torch.eye(OUT), torch.eye(IN))
    with pytest.raises(ValueError, match="delta"):
        block.logdet(-1.0)
    with pytest.raises(ValueError, match="scale"):
        block.inv_mv(torch.zeros(OUT, IN, dtype=F64), 0.1, scale=0.0)
    with pytest.raises(ValueError, match=r"m must have shape \(\.\.\., 7, 5\)"):
        block.inv_mv(torch.zeros(IN, OUT, dtype=F64), 0.1)


# ---- memory ----------------------------------------------------------------------------------------------------
def test_llama7b_lora_factor_memory():
    shapes = llama7b_lora_shapes()  # LoRA r=8 on q, v of 32 layers: lora_A (8, 4096) and lora_B (4096, 8)
    assert len(shapes) == 128 and shapes[:2] == [(8, 4096), (4096, 8)]
    # Per weight one 4096 × 4096 factor (A of lora_A, G of lora_B) and one 8 × 8: 128 big factors of 64 MiB.
    full = factor_memory(shapes)
    assert full == 128 * 4096**2 * 4 + 128 * 8**2 * 4 == 8_589_967_360  # 8 GiB + 32 KiB
    # Rank k: 4096 k + k + 1 numbers per big factor (U, λ, ρ); the 8 × 8 factors stay dense.
    expected = {64: 134_283_776, 128: 268_534_272, 256: 537_035_264}  # ~128 / 256 / 512 MiB
    for rank, nbytes in expected.items():
        assert factor_memory(shapes, rank=rank) == nbytes == 4 * 128 * (4096 * rank + rank + 1 + 64)
        assert nbytes < 2**30
    assert factor_memory(shapes, rank=64, dtype_bytes=2) == expected[64] // 2
    assert factor_memory([(3, 5)], rank=4) == 4 * (9 + 5 * 4 + 4 + 1)
    assert len(llama7b_lora_shapes(16, ("q_proj", "k_proj", "v_proj", "o_proj"))) == 256
    with pytest.raises(ValueError, match="unknown LLaMA-7B targets"):
        llama7b_lora_shapes(targets=("query",))
