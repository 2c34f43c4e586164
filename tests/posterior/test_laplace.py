"""The Laplace posterior (``posterior.laplace``) against dense float64 computations.

The oracle: the option scores computed by own code through ``torch.func.functional_call``, their Jacobians w.r.t. the
adapter weight matrices by ``jacrev``, the exact GGN ``Σ_n J_nᵀ (diag p - p pᵀ) J_n`` and every formula on dense
(P, P) matrices with ``torch.linalg`` (P = 288 weights). A tiny float64 GPT-2 (LoRA r = 2 on the Conv1D ``c_attn``
and ``mlp.c_proj``, B ≠ 0): its forward runs in float64 end to end (LLaMA's RMSNorm does not, see test_curvature).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, jacrev

from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.options import options_from_args
from peft_bayes.posterior import Laplace, LaplaceOptions, load_posterior
from peft_bayes.posterior.laplace import glm_probabilities
from peft_bayes.posterior.likelihood import IGNORE
from peft_bayes.tiny import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # jacrev over sdpa

F64 = {"rtol": 1e-8, "atol": 1e-12}
FIT_PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
]
FIT_LABELS = [1, 1, 0, 2]  # not all the MAP predictions
TEST_PAIRS = [
    [("2+2=", " 4"), ("2+2=", " 5"), ("2+2=", " 22")],
    [("The answer is", " A"), ("The answer is", " B")],
    [("8-5=", " 3"), ("8-5=", " 13")],
]
TEST_LABELS = [1, 0, 1]  # an interior optimum of the validation NLL over the prior grid


# --- the dense oracle ------------------------------------------------------------------------------------------------
def weight_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if re.search(r"\.lora_[AB]\.default\.weight$", n)]


def ref_scores(model, params, batch) -> torch.Tensor:
    """(B, K) option scores, -inf where an example has fewer options."""
    logits = functional_call(model, params, (batch.input_ids,), {"attention_mask": batch.attention_mask}).logits
    logp = logits.log_softmax(-1)
    scored = batch.targets != IGNORE
    token_lp = torch.where(scored, logp.gather(-1, batch.targets.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    rows = token_lp.sum(-1) * batch.row_weight.to(logp.dtype)
    out = torch.full((batch.n_examples, int(batch.option.max()) + 1), float("-inf"), dtype=logp.dtype)
    return out.index_put((batch.example, batch.option), rows)


class Dense:
    """θ*, the fit data's log-likelihood and exact GGN, and the test batches' scores and Jacobians, all dense."""

    def __init__(self, model, fit_batches, test_batches) -> None:
        names = weight_names(model)
        all_params = dict(model.named_parameters())
        params = {n: all_params[n].detach() for n in names}
        self.theta = torch.cat([params[n].flatten() for n in names])

        def jacobian(batch):
            jac = jacrev(ref_scores, argnums=1)(model, params, batch)
            return torch.cat([jac[n].flatten(2) for n in names], -1)  # (B, K, P)

        self.loglik, self.H = 0.0, 0
        for batch in fit_batches:
            f = ref_scores(model, params, batch)
            self.loglik += float(f.log_softmax(-1).gather(1, batch.labels[:, None]).sum())
            J, p = jacobian(batch), f.softmax(-1)
            lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            self.H = self.H + torch.einsum("bkp,bkl,blq->pq", J, lam, J)
        self.tests = [(ref_scores(model, params, b), jacobian(b)) for b in test_batches]
        self.sizes = [params[n].numel() for n in names]

    def deltas(self, prior) -> torch.Tensor:
        """(P,) per-weight prior precision from one scalar or one value per site."""
        prior = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
        if prior.numel() == 1:
            return prior.expand(self.theta.numel())
        return torch.cat([d.expand(n) for d, n in zip(prior, self.sizes)])

    def lml(self, H, prior) -> float:
        d = self.deltas(prior)
        logdet = torch.linalg.slogdet(H + torch.diag(d))[1]
        return float(self.loglik - 0.5 * logdet + 0.5 * d.log().sum() - 0.5 * (d * self.theta**2).sum())

    def covariances(self, H, prior) -> list[torch.Tensor]:
        """J (H + δ)⁻¹ Jᵀ (B, K, K) of every test batch."""
        inverse = torch.linalg.inv(H + torch.diag(self.deltas(prior)))
        return [J @ inverse @ J.mT for _, J in self.tests]


def structure_H(laplace: Laplace, dense: Dense) -> torch.Tensor:
    """The dense H a fitted structure stands for: the oracle's for ``full``, else block-diagonal over the sites
    (torch.kron of the K-FAC factors, or the diagonal)."""
    if laplace.options.structure == "full":
        return dense.H
    if laplace.options.structure == "kron":
        return torch.block_diag(*(torch.kron(b.G, b.A) for b in laplace.blocks))
    return torch.diag(torch.cat([b.d.flatten() for b in laplace.blocks]))


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    base = build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(base, config).double().eval()
    fit_batches = list(PairScorer(model, tiny_tokenizer, FIT_PAIRS, 2, norm="tokens", labels=FIT_LABELS).batches())
    test_scorer = PairScorer(model, tiny_tokenizer, TEST_PAIRS, 2, labels=TEST_LABELS)
    test_batches = list(test_scorer.batches())
    return model, fit_batches, test_scorer, test_batches, Dense(model, fit_batches, test_batches)


def fitted(model, batches, **options) -> Laplace:
    laplace = Laplace(model, **{"fisher": "exact", "prior_method": "fixed", **options})
    laplace.fit(batches)
    return laplace


# --- marginal likelihood and its optimum -----------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_log_marginal_likelihood_matches_dense(setup, structure):
    """log p(D | θ*) - ½ log det(H + δ) + ½ Σ log δ_i - ½ Σ δ_i θ*_i², with per-site δ for kron / diag."""
    model, fit_batches, *_, dense = setup
    laplace = fitted(model, fit_batches, structure=structure)
    assert laplace.loglik == pytest.approx(dense.loglik, rel=1e-12)
    assert laplace.n_data == len(FIT_LABELS)
    H = structure_H(laplace, dense)
    for delta in (1e-2, 1.0, 30.0):
        prior = torch.tensor([delta], dtype=torch.float64)
        assert float(laplace.log_marginal_likelihood(prior)) == pytest.approx(dense.lml(H, prior), rel=1e-10)
    if structure != "full":
        per_layer = fitted(model, fit_batches, structure=structure, prior_per_layer=True)
        prior = torch.tensor([0.3, 2.0, 0.05, 7.0], dtype=torch.float64)
        assert float(per_layer.log_marginal_likelihood(prior)) == pytest.approx(dense.lml(H, prior), rel=1e-10)


def dense_optimum(eigvals: torch.Tensor, theta_sq: float) -> float:
    """The δ maximising -½ Σ log(λ_i + δ) + ½ n log δ - ½ δ ‖θ‖²: the root of Σ_i λ_i / (δ (λ_i + δ)) = ‖θ‖²,
    whose left side decreases in δ, by bisection in log δ."""
    lo, hi = math.log(1e-8), math.log(1e8)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        delta = math.exp(mid)
        excess = float((eigvals / (delta * (eigvals + delta))).sum()) - theta_sq
        lo, hi = (mid, hi) if excess > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


@pytest.mark.parametrize("structure,per_layer", [("full", False), ("kron", True)])
def test_marglik_prior_reaches_the_dense_optimum(setup, structure, per_layer):
    model, fit_batches, *_, dense = setup
    laplace = fitted(model, fit_batches, structure=structure, prior_method="marglik", prior_per_layer=per_layer)
    H = structure_H(laplace, dense)
    edges = torch.tensor([0, *dense.sizes]).cumsum(0).tolist() if per_layer else [0, dense.theta.numel()]
    expected = []
    for lo, hi in zip(edges, edges[1:]):
        eig = torch.linalg.eigvalsh(H[lo:hi, lo:hi]).clamp_min(0)
        expected.append(dense_optimum(eig, float(dense.theta[lo:hi].pow(2).sum())))
    expected = torch.tensor(expected, dtype=torch.float64)
    assert ((expected - 1).abs() > 0.1).all()  # away from the search's start (δ = 1)
    torch.testing.assert_close(laplace.prior_precision, expected, rtol=1e-4, atol=0)
    assert dense.lml(H, laplace.prior_precision) == pytest.approx(dense.lml(H, expected), abs=1e-8)


# --- GLM predictive --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_glm_moments_match_dense(setup, structure):
    """f at θ* and Σ_f = J (H + δ)⁻¹ Jᵀ for two priors at once; kron and diag with their own block-diagonal H."""
    model, fit_batches, _, test_batches, dense = setup
    laplace = fitted(model, fit_batches, structure=structure)
    H = structure_H(laplace, dense)
    priors = [torch.tensor([0.05], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]
    expected = [dense.covariances(H, prior) for prior in priors]  # [prior][batch]
    for b, (batch, (f_ref, _)) in enumerate(zip(test_batches, dense.tests)):
        f, covs = laplace.glm_moments(batch, priors)
        assert torch.equal(torch.isfinite(f), torch.isfinite(f_ref))
        torch.testing.assert_close(f[torch.isfinite(f)], f_ref[torch.isfinite(f_ref)], **F64)
        assert len(covs) == len(priors)
        for cov, per_prior in zip(covs, expected):
            assert per_prior[b].abs().max() > 1e-3
            torch.testing.assert_close(cov, per_prior[b], **F64)


def pairwise_probit(f: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The pairwise probit of one example, written out: p_k ∝ 1 / Σ_j exp(-(f_k - f_j) / sqrt(1 + π/8 v_kj)),
    v_kj = Var(f_k - f_j)."""
    k = f.shape[0]
    p = torch.empty(k, dtype=torch.float64)
    for a in range(k):
        total = 0.0
        for b in range(k):
            v = cov[a, a] + cov[b, b] - 2 * cov[a, b]
            total += math.exp(-float(f[a] - f[b]) / math.sqrt(1 + math.pi / 8 * float(v)))
        p[a] = 1 / total
    return p / p.sum()


@pytest.mark.parametrize("glm_batch_size", [1, 3])
def test_option_probs_are_the_dense_probit_predictive(setup, glm_batch_size):
    """End to end (``option_probs`` of the scorer evaluation hands over): the pairwise probit of each example's own
    options' scores and covariance, with the full structure's dense oracle; one example per differentiable batch
    (the default) or all three in one."""
    model, fit_batches, scorer, test_batches, dense = setup
    laplace = fitted(model, fit_batches, structure="full", glm_batch_size=glm_batch_size)
    laplace.prior_precision = torch.tensor([0.2], dtype=torch.float64)
    probs = laplace.option_probs(scorer, samples=0, seed=0)
    covs = dense.covariances(dense.H, 0.2)
    for batch, (f, _), cov in zip(test_batches, dense.tests, covs):
        for row, index in enumerate(batch.index.tolist()):
            k = len(TEST_PAIRS[index])
            expected = pairwise_probit(f[row, :k], cov[row][:k, :k])
            torch.testing.assert_close(probs[index], expected, **F64)
            assert (probs[index] - f[row, :k].softmax(-1)).abs().max() > 1e-3  # the covariance matters


def logistic_normal_mean(m: float, v: float) -> float:
    """E[sigmoid(m + sqrt(v) z)], z ~ N(0, 1), by 80-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float((w / np.sqrt(2 * np.pi) / (1 + np.exp(-(m + np.sqrt(v) * x)))).sum())


def test_glm_probabilities_probit_and_mc_links():
    f = torch.tensor([[1.5, -0.5, float("-inf")], [0.3, 0.8, -1.0]], dtype=torch.float64)
    # A correlated covariance on the two real options of example 0; a general one on example 1.
    a = torch.tensor([[1.2, 0.3, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[0.5, 0.2, -0.4], [0.1, 0.9, 0.3], [0.0, -0.6, 0.8]], dtype=torch.float64)
    cov = torch.stack([a, r @ r.T])
    probit = glm_probabilities(f, cov, "probit")
    torch.testing.assert_close(probit[0, :2], pairwise_probit(f[0, :2], cov[0][:2, :2]), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(probit[1], pairwise_probit(f[1], cov[1]), rtol=1e-12, atol=1e-15)
    assert probit[0, 2] == 0 and torch.allclose(probit.sum(-1), torch.ones(2, dtype=torch.float64))
    # Two options: MacKay's probit of the difference, sigmoid(d / sqrt(1 + π/8 Var d)).
    d, v = 2.0, 1.2 + 0.7 - 0.6
    assert math.isclose(float(probit[0, 0]), 1 / (1 + math.exp(-d / math.sqrt(1 + math.pi / 8 * v))), rel_tol=1e-12)

    mc = glm_probabilities(f, cov, "mc", samples=200_000, generator=torch.Generator().manual_seed(0))
    assert mc[0, 2] == 0 and torch.allclose(mc.sum(-1), torch.ones(2, dtype=torch.float64))
    # Two options: p_0 = E[sigmoid(f_0 - f_1 + noise)], the noise's variance a00 + a11 - 2 a01: a 1-D integral.
    exact = logistic_normal_mean(2.0, 1.2 + 0.7 - 0.6)
    assert abs(float(mc[0, 0]) - exact) < 4 * 0.5 / math.sqrt(200_000)  # 4 standard errors (std ≤ 0.5)
    assert abs(float(probit[0, 0]) - exact) < 0.002  # the probit approximation: close (here 6e-4), not exact
    # Like the exact predictive, blind to what moves every score together: a shift of the means (option
    # log-likelihoods sit far below zero), and covariance along the all-ones direction.
    shifted = glm_probabilities(f - 40.0, cov, "probit")
    torch.testing.assert_close(shifted, probit, rtol=1e-12, atol=1e-15)
    ones = torch.ones(2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(glm_probabilities(f - 40.0, cov + 9.0 * ones, "probit"), probit, rtol=1e-10, atol=1e-12)
    # Four options with log-likelihood-like scores, against the Monte-Carlo predictive (the exact one to 200k draws).
    g = torch.tensor([[-31.0, -32.5, -30.2, -33.0]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1, -0.3, 0.2], [0.4, 1.1, 0.2, -0.5], [0.0, 0.3, 0.6, 0.1], [0.2, -0.2, 0.5, 1.3]])
    gcov = (q @ q.T).to(torch.float64)[None] + 2.0  # a large shared component, as LoRA perturbations give
    exact4 = glm_probabilities(g, gcov, "mc", samples=200_000, generator=torch.Generator().manual_seed(1))
    assert (glm_probabilities(g, gcov, "probit") - exact4).abs().max() < 0.03
    # Zero covariance: both links are the plain softmax.
    zero = torch.zeros_like(cov)
    torch.testing.assert_close(glm_probabilities(f, zero, "probit"), f.softmax(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(glm_probabilities(f, zero, "mc", samples=3), f.softmax(-1), rtol=1e-12, atol=1e-15)


def test_tune_prior_on_validation_is_the_dense_argmin(setup):
    """The grid δ with the lowest probit NLL of the validation examples, in eval mode whatever the model's mode (a
    copy with LoRA dropout, left in training mode, must give the eval-mode answer and stay in training mode)."""
    model, fit_batches, _, test_batches, dense = setup
    laplace = fitted(model, fit_batches, structure="full", prior_method="val")
    grid = tuple(10.0 ** (k / 2) for k in range(-16, 13))  # 1e-8 ... 1e6: here the optimum is below 1e-3
    nll = []
    for delta in grid:
        total = 0.0
        for batch, (f, _), cov in zip(test_batches, dense.tests, dense.covariances(dense.H, delta)):
            for row, (index, label) in enumerate(zip(batch.index.tolist(), batch.labels.tolist())):
                k = len(TEST_PAIRS[index])
                total -= math.log(float(pairwise_probit(f[row, :k], cov[row][:k, :k])[label]))
        nll.append(total)
    best = grid[int(np.argmin(nll))]
    assert grid[0] < best < grid[-1], nll  # an interior optimum
    assert laplace.tune_prior_on_validation(test_batches, grid) == best
    assert laplace.prior_precision.tolist() == [best]

    noisy = copy.deepcopy(model)
    for module in noisy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    noisy_laplace = fitted(noisy, fit_batches, structure="full", prior_method="val")
    noisy.train()
    assert noisy_laplace.tune_prior_on_validation(test_batches, grid) == best
    assert noisy.training


# --- sampling, save / load -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_weight_draws_have_the_posterior_precision(setup, structure):
    """ε ~ N(0, P⁻¹) per site in its weight's layout: E[εᵀ P ε] = P's size (a χ² mean; 400 draws: ±1% at 3 σ)."""
    model, fit_batches, *_, dense = setup
    laplace = fitted(model, fit_batches, structure=structure, prior_precision=0.5)
    sites = laplace.sites
    precision = structure_H(laplace, dense) + 0.5 * torch.eye(dense.theta.numel(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(400):
        eps = laplace.draw(gen)
        assert [tuple(e.shape) for e in eps] == [tuple(s.weight.shape) for s in sites]
        draws.append(torch.cat([e.flatten() for e in eps]))
    draws = torch.stack(draws)
    quad = torch.einsum("sp,pq,sq->s", draws, precision, draws).mean() / draws.shape[1]
    assert abs(float(quad) - 1) < 0.03


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_save_load_and_sample_contexts(setup, tmp_path, structure):
    model, fit_batches, scorer, *_ = setup
    model = copy.deepcopy(model)  # this test moves the weights
    scorer = PairScorer(model, scorer.tokenizer, TEST_PAIRS, 2, labels=TEST_LABELS)
    laplace = fitted(model, fit_batches, structure=structure, prior_method="marglik")
    laplace.save(str(tmp_path / "laplace"))
    loaded = load_posterior(model, str(tmp_path / "laplace"))
    assert isinstance(loaded, Laplace) and loaded.options == laplace.options
    assert torch.equal(loaded.prior_precision, laplace.prior_precision)
    for p, q in zip(laplace.option_probs(scorer, 0, 0), loaded.option_probs(scorer, 0, 0)):
        assert torch.equal(p, q)

    sites = laplace.sites
    mean = [s.weight.detach().clone() for s in sites]
    digest = hashlib.sha256()  # the fingerprint written out: each site's name, then its weight's float32 bytes
    for site in sites:
        digest.update(site.name.encode() + site.weight.detach().float().numpy().tobytes())
    assert laplace.fingerprint == loaded.fingerprint == digest.hexdigest()
    with laplace.sample(7):
        first = [s.weight.detach().clone() for s in sites]
    assert all(torch.equal(s.weight, m) for s, m in zip(sites, mean))  # restored exactly
    with loaded.sample(7):
        again = [s.weight.detach().clone() for s in sites]
    with laplace.sample(8):
        other = [s.weight.detach().clone() for s in sites]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all((a - m).abs().max() > 0 for a, m in zip(first, mean))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(RuntimeError), laplace.sample(9):
        raise RuntimeError("a failing pass")
    assert all(torch.equal(s.weight, m) for s, m in zip(sites, mean))  # restored after an error too

    with torch.no_grad():
        sites[1].weight[0, 0] += 1e-3  # the adapter changed after fitting
    with pytest.raises(InputError, match="fitted on other adapter weights \\(fingerprint differs\\)"):
        load_posterior(model, str(tmp_path / "laplace"))


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,flag",
    [
        ("subset", "laplace_subset"),
        ("structure", "laplace_structure"),
        ("likelihood", "laplace_likelihood"),
        ("fisher", "laplace_fisher"),
        ("kfac", "laplace_kfac"),
        ("prior_method", "prior_method"),
        ("predictive", "laplace_predictive"),
        ("link", "link"),
    ],
)
def test_unknown_option_values_name_the_field_or_the_flag(field, flag):
    with pytest.raises(InputError, match=f"^{field} must be one of .*, got 'bogus'$"):  # the Python API: the field
        LaplaceOptions(**{field: "bogus"})
    with pytest.raises(InputError, match=f"^--{flag} must be one of .*, got 'bogus'$"):  # the scripts: the flag
        options_from_args(LaplaceOptions, argparse.Namespace(**{flag: "bogus"}))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prior_precision": 0.0}, "^prior_precision must be a positive number"),
        ({"prior_precision": float("nan")}, "^prior_precision must be a positive number"),
        ({"fisher_samples": 0}, "^fisher_samples must be positive"),
        ({"fisher": "exact", "likelihood": "lm"}, "^fisher exact needs likelihood choice"),
        ({"prior_per_layer": True, "structure": "full"}, "^prior_per_layer needs structure kron or diag"),
        ({"prior_per_layer": True, "prior_method": "val"}, "^prior_per_layer is tuned by prior_method marglik"),
    ],
)
def test_inconsistent_options_are_refused(options, match):
    with pytest.raises(InputError, match=match):
        LaplaceOptions(**options)


def test_unfitted_posterior_is_refused(setup, tmp_path):
    model, _, scorer, test_batches, _ = setup
    laplace = Laplace(model)
    assert not laplace.is_fitted
    calls = [
        lambda: laplace.log_marginal_likelihood(),
        lambda: laplace.glm_moments(test_batches[0]),
        lambda: laplace.option_probs(scorer, 0, 0),
        lambda: laplace.tune_prior_on_validation(test_batches),
        lambda: laplace.draw(torch.Generator()),
        lambda: laplace.sample(0).__enter__(),
        lambda: laplace.save(str(tmp_path / "unfitted")),
    ]
    for call in calls:
        with pytest.raises(InputError, match="^the Laplace posterior is not fitted"):
            call()


def test_empirical_fisher_needs_gold_labels(setup):
    model, fit_batches, *_ = setup
    batch = copy.copy(fit_batches[0])
    batch.labels = torch.full_like(batch.labels, -1)
    with pytest.raises(InputError, match="needs the gold answer of every fit example"):
        Laplace(model, fisher="empirical").fit([batch])


# --- low-rank K-FAC factors ------------------------------------------------------------------------------------------
def test_low_rank_factors_at_full_rank_equal_dense_factors(setup):
    model, fit_batches, _, test_batches, _ = setup
    dense = fitted(model, fit_batches, structure="kron")
    low = fitted(model, fit_batches, structure="kron", kfac_rank=64, kfac_threshold=15)  # every wide factor streamed
    assert {b.kind for b in low.blocks} == {"kron_lowrank"}  # every weight has one factor wider than 15
    assert low.captured_mass == pytest.approx([1.0] * len(low.sites), abs=1e-12)
    torch.testing.assert_close(low.log_marginal_likelihood(), dense.log_marginal_likelihood(), rtol=1e-9, atol=0)
    f_low, (cov_low,) = low.glm_moments(test_batches[0])
    f_dense, (cov_dense,) = dense.glm_moments(test_batches[0])
    torch.testing.assert_close(f_low, f_dense, **F64)
    torch.testing.assert_close(cov_low, cov_dense, rtol=1e-8, atol=1e-12 * float(cov_dense.abs().max()))


def test_low_rank_factors_truncate_report_and_round_trip(setup, tmp_path):
    model, fit_batches, test_scorer, _, _ = setup
    dense = fitted(model, fit_batches, structure="kron")
    low = fitted(model, fit_batches, structure="kron", kfac_rank=3, kfac_threshold=15)
    assert all(0 < m <= 1 for m in low.captured_mass) and min(low.captured_mass) < 0.999
    lml_low, lml_dense = float(low.log_marginal_likelihood()), float(dense.log_marginal_likelihood())
    assert math.isfinite(lml_low) and lml_low != pytest.approx(lml_dense, rel=1e-6)
    low.save(str(tmp_path / "low"))
    # On disk as fitted: each wide factor as its top 3 eigenvectors (+ eigenvalues and one scalar), no d x d matrix
    saved = low.state_dict()
    vectors = [v for k, v in saved.items() if k.endswith(".U")]
    assert vectors and all(v.shape[1] <= 3 for v in vectors if v.shape[0] > 15)
    assert sum(v.numel() for v in saved.values()) < sum(v.numel() for v in dense.state_dict().values())
    again = load_posterior(model, str(tmp_path / "low"))
    assert [b.kind for b in again.blocks] == [b.kind for b in low.blocks]
    # float64 to an ulp or two: the reloaded factors are new (contiguous) tensors, so BLAS may sum in another order
    for p, q in zip(low.option_probs(test_scorer, 0, 0), again.option_probs(test_scorer, 0, 0)):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15)


def test_low_rank_needs_kron():
    with pytest.raises(InputError, match="^kfac_rank needs structure kron"):
        LaplaceOptions(structure="diag", kfac_rank=4)


def test_low_rank_factors_on_a_float32_model(setup):
    """fp32 adapters: dense (kernel, fp32) and streamed (float64, returned in fp32) factors of one weight combine."""
    model, fit_batches, _, test_batches, _ = setup
    dense = fitted(model, fit_batches, structure="kron")
    low = fitted(copy.deepcopy(model).float(), fit_batches, structure="kron", kfac_rank=64, kfac_threshold=15)
    assert {b.kind for b in low.blocks} == {"kron_lowrank"} and {b.dtype for b in low.blocks} == {torch.float32}
    lml_low, lml_dense = float(low.log_marginal_likelihood()), float(dense.log_marginal_likelihood())
    assert lml_low == pytest.approx(lml_dense, rel=1e-4)
