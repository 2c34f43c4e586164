"""K-FAC statistics (masked, weighted Gram matrices and row sums) against dense float64 computations.

Both paths, the Triton kernels (on CPU in triton's interpreter: tests/conftest.py sets ``TRITON_INTERPRET=1`` before
triton is imported) and the pure-PyTorch reference, over a grid of odd sizes, fp32 / fp16 / bf16, with and without
padding and row weights:

- ``expand``: ``Σ w x xᵀ`` over tokens added into the upper triangle of an accumulator that already holds a sum;
  its lower triangle keeps its (sentinel) values; padding holds NaN, which must never be read;
- ``reduce``: per-row sums / means over real tokens, then the Gram over rows;
- several tiles and token splits (small blocks forced), two calls = one call over both batches, fp64;
- ``mirror_upper_``; the dispatch (``PEFT_BAYES_KERNEL``, CPU default, fp64) and bad input.

Tolerances are relative to ``Σ |w| |x| |x|ᵀ`` entrywise (the magnitude the fp32 accumulation rounds against):
products of fp16 / bf16 inputs are exact in fp32, so 0/1 masks meet the fp32 tolerance in every dtype; row weights
are rounded into the 16-bit operand on the GPU's tensor-core path (2^-11 fp16, 2^-8 bf16).
"""

from __future__ import annotations

import pytest
import torch

from peft_bayes.kernels import kfac
from peft_bayes.kernels import sampled_lora as sl

DEVICE = sl.kernel_device().type
PATHS = [pytest.param("triton", marks=pytest.mark.triton), "reference"]  # triton: tests/kernels/conftest.py
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL_EXACT = 2e-5  # fp32 accumulation of exact products over <= 40 terms
RTOL_WEIGHTED = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SENTINEL = -7.25


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv(sl.KERNEL_ENV, request.param)
    return request.param


def _inputs(r, t, d, dtype, masked, weighted, seed=0):
    """x (r, t, d) with NaN at padding, mask (r, t) bool or None, row weights (r,) in [-1, 2) with a zero, or None."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(r, t, d, generator=g) + 0.5).to(dtype)
    mask = rw = None
    if masked:
        mask = torch.rand(r, t, generator=g) < 0.7
        mask[0, 0] = True
        x[~mask] = float("nan")
    if weighted:
        rw = 3 * torch.rand(r, generator=g) - 1  # negative weights: the weight goes on one operand, not sqrt on both
        if r > 1:
            rw[-1] = 0.0
    return [None if v is None else v.to(DEVICE) for v in (x, mask, rw)]


def _oracle(x, mask=None, rw=None):
    """(Σ w x xᵀ, Σ |w| |x| |x|ᵀ) in float64 over the tokens of nonzero weight. x (..., d)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    w = torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    if mask is not None:
        w = w * mask.double()
    if rw is not None:
        w = w * (rw.double()[:, None] if x.dim() == 3 else rw.double())
    keep = w.reshape(-1) != 0
    x64, w = x64[keep], w.reshape(-1)[keep]
    return (x64 * w[:, None]).T @ x64, (x64.abs() * w.abs()[:, None]).T @ x64.abs()


def _start(d, seed=1):
    """An accumulator holding an earlier sum in its upper triangle and sentinels below."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.randn(d, d, generator=g).triu()
    return (prior + torch.full((d, d), SENTINEL).tril(-1)).to(DEVICE), prior.to(DEVICE, torch.float64)


def _assert_upper(out, want, scale, rtol, prior=None):
    """Upper triangle of ``out`` == prior + want within rtol * scale; lower triangle still the sentinel."""
    d = out.shape[0]
    upper = torch.ones(d, d, dtype=torch.bool, device=out.device).triu()
    expected = want if prior is None else prior + want
    err = (out.double() - expected).abs()[upper]
    assert torch.isfinite(out[upper]).all()
    assert (err <= rtol * scale[upper] + 1e-6).all(), f"max error {err.max():.3g}, scale {scale.max():.3g}"
    if prior is not None:
        assert (out[~upper] == SENTINEL).all()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,t", [(1, 1), (1, 7), (3, 11)])
@pytest.mark.parametrize("d", [1, 5, 17, 40])
@pytest.mark.parametrize("masked,weighted", [(False, False), (True, False), (False, True), (True, True)])
def test_expand_gram(path, dtype, r, t, d, masked, weighted):
    x, mask, rw = _inputs(r, t, d, dtype, masked, weighted)
    out, prior = _start(d)
    assert kfac.accumulate_gram_(out, x, mask, rw) is out
    want, scale = _oracle(x, mask, rw)
    _assert_upper(out, want, scale, RTOL_WEIGHTED[dtype] if weighted else RTOL_EXACT, prior)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mean", [False, True])
def test_reduce_row_sums_then_gram(path, dtype, mean):
    r, t, d = 5, 9, 17
    x, mask, _ = _inputs(r, t, d, dtype, masked=True, weighted=False)
    mask[2] = False  # a row without real tokens: sum and mean 0
    x64 = torch.where(mask[..., None], x.double(), 0.0)
    want = x64.sum(1)
    if mean:
        want = want / mask.sum(1, keepdim=True).clamp_min(1)
    sums = kfac.masked_row_sums(x, mask, mean=mean)
    assert sums.shape == (r, d) and sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), want, rtol=0, atol=1e-5 * x64.abs().sum(1).max().item())
    assert (sums[2] == 0).all()
    rw = torch.linspace(0.5, 2.0, r, device=DEVICE)
    out, prior = _start(d)
    kfac.accumulate_gram_(out, sums, row_weight=rw)  # (N, d) rows, (N,) weights
    gram, scale = _oracle(sums, rw=rw)
    _assert_upper(out, gram, scale, RTOL_EXACT, prior)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("r,t,d", [(1, 1, 1), (2, 40, 130), (3, 7, 5)])
def test_row_sums_shapes_and_masks(path, r, t, d):
    """Several T and d blocks; no mask; int and float masks (a weighted mean)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(r, t, d, generator=g).to(DEVICE, torch.bfloat16)
    x64 = x.double()
    torch.testing.assert_close(kfac.masked_row_sums(x).double(), x64.sum(1), rtol=1e-6, atol=1e-5)
    fmask = torch.rand(r, t, generator=g).to(DEVICE)
    fmask[:, 0] = 0.0 if t > 1 else 0.5  # a float weight of 0: the token is skipped
    want = torch.einsum("rt,rtd->rd", fmask.double(), x64) / fmask.double().sum(1, keepdim=True)
    got = kfac.masked_row_sums(x, fmask, mean=True).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    imask = (fmask > 0.5).int()
    want = (x64 * imask[..., None]).sum(1)
    torch.testing.assert_close(kfac.masked_row_sums(x, imask).double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("d,tokens", [(17, 33), (40, 7), (150, 3)])
@pytest.mark.parametrize("n_split", [1, 3])
def test_tiles_and_splits(monkeypatch, d, tokens, n_split):
    """16 x 16 tiles (up to 10 x 10 of them, upper ones only) and token splits summed by the host."""
    x, mask, rw = _inputs(1, tokens, d, torch.float16, masked=True, weighted=True)
    x2, w = kfac._flatten(x, mask, rw, torch.float32)
    out, prior = _start(d)
    kfac._gram_triton(out, x2, w, n_split=n_split, block_d=16, block_n=16)
    want, scale = _oracle(x, mask, rw)
    _assert_upper(out, want, scale, RTOL_WEIGHTED[torch.float16], prior)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_two_calls_accumulate_and_mirror(path):
    a = _inputs(2, 5, 17, torch.bfloat16, masked=True, weighted=True, seed=4)
    b = _inputs(3, 6, 17, torch.bfloat16, masked=True, weighted=False, seed=5)
    out = torch.zeros(17, 17, device=DEVICE)
    kfac.accumulate_gram_(out, *a)
    kfac.accumulate_gram_(out, *b)
    assert (out.tril(-1) == 0).all()  # nothing written below the diagonal before mirroring
    (want_a, scale_a), (want_b, scale_b) = _oracle(*a), _oracle(*b)
    _assert_upper(out, want_a + want_b, scale_a + scale_b, RTOL_WEIGHTED[torch.bfloat16])
    assert kfac.mirror_upper_(out) is out
    want, scale = want_a + want_b, scale_a + scale_b
    assert ((out.double() - want).abs() <= 8e-3 * scale + 1e-6).all()  # the whole matrix now
    assert torch.equal(out, out.T)


def test_mirror_upper_():
    m = torch.randn(6, 6)
    upper = m.triu().clone()
    kfac.mirror_upper_(m)
    assert torch.equal(m.triu(), upper) and torch.equal(m.tril(-1), upper.T.tril(-1))
    with pytest.raises(ValueError, match="square"):
        kfac.mirror_upper_(torch.zeros(2, 3))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_float64(path):
    """fp64 x with an fp64 accumulator: the reference path (kernels accumulate in fp32), exact to fp64 rounding."""
    x, mask, rw = _inputs(2, 7, 5, torch.float64, masked=True, weighted=True)
    assert kfac.kfac_path(x) == "reference"
    out = torch.zeros(5, 5, dtype=torch.float64, device=DEVICE)
    kfac.accumulate_gram_(out, x, mask, rw)
    want, scale = _oracle(x, mask, rw)
    _assert_upper(out, want, scale, 1e-13)
    assert kfac.masked_row_sums(x, mask).dtype == torch.float64


@pytest.mark.triton
def test_triton_into_float64_accumulator(monkeypatch):
    monkeypatch.setenv(sl.KERNEL_ENV, "triton")
    x, mask, rw = _inputs(3, 11, 17, torch.float32, masked=True, weighted=True)
    out = torch.full((17, 17), 1e8, dtype=torch.float64, device=DEVICE)  # fp32 would lose the sum's low digits
    kfac.accumulate_gram_(out, x, mask, rw)
    want, scale = _oracle(x, mask, rw)
    _assert_upper(out - 1e8, want, scale, RTOL_EXACT)


def test_dispatch(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(sl.KERNEL_ENV, raising=False)
    assert kfac.kfac_path(x) == "reference"  # CPU default
    monkeypatch.setenv(sl.KERNEL_ENV, "reference")
    assert kfac.kfac_path(x) == "reference"
    monkeypatch.setattr(kfac, "_gram_triton", None)  # the reference path must not touch the kernels
    monkeypatch.setattr(kfac, "_row_sums_triton", None)
    kfac.accumulate_gram_(torch.zeros(3, 3), x)
    kfac.masked_row_sums(x[None])
    monkeypatch.setenv(sl.KERNEL_ENV, "bogus")
    with pytest.raises(ValueError, match="PEFT_BAYES_KERNEL"):
        kfac.kfac_path(x)
    if sl.triton is not None:
        monkeypatch.setenv(sl.KERNEL_ENV, "triton")
        monkeypatch.setattr(sl, "_interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kfac.kfac_path(x)


@pytest.mark.triton
def test_dispatch_triton(monkeypatch):
    x = torch.randn(2, 3, 4, device=DEVICE)
    monkeypatch.setenv(sl.KERNEL_ENV, "triton" if DEVICE == "cpu" else "auto")
    assert kfac.kfac_path(x) == "triton"
    assert kfac.kfac_path(x.double()) == "reference"

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran the reference")

    monkeypatch.setattr(kfac, "gram_reference", boom)
    monkeypatch.setattr(kfac, "row_sums_reference", boom)
    kfac.accumulate_gram_(torch.zeros(4, 4, device=DEVICE), x)
    kfac.masked_row_sums(x)


def test_bad_input():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="mask"):
        kfac.accumulate_gram_(torch.zeros(4, 4), x, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="row_weight"):
        kfac.accumulate_gram_(torch.zeros(4, 4), x, row_weight=torch.ones(3))
    with pytest.raises(ValueError, match="out"):
        kfac.accumulate_gram_(torch.zeros(3, 3), x)
    with pytest.raises(ValueError, match="out"):
        kfac.accumulate_gram_(torch.zeros(4, 4, dtype=torch.float16), x)
    with pytest.raises(ValueError, match="x"):
        kfac.accumulate_gram_(torch.zeros(4, 4), x.int())
    with pytest.raises(ValueError, match="x"):
        kfac.masked_row_sums(x[0])
