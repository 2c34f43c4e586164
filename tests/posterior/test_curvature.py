"""Curvature of the Laplace posterior (``posterior.curvature``, ``posterior.fisher``) against independent computations.

- ``full`` / ``diag`` equal the dense GGN / empirical Fisher over the adapter weight matrices built from
  ``torch.func`` Jacobians of the option scores (own scoring code, ``functional_call`` over the site weights), for
  the ``choice`` and ``lm`` likelihoods, in float64.
- K-FAC is checked where it is exact: one token (the Kronecker product of one outer product), a deep linear
  network with weight sharing (``expand``: Eschenhagen et al. 2023's closed form; ``reduce``: the GGN of the
  per-example summed output), and one example whose rows share a one-token context (``reduce`` exact, ``expand``
  the curvature without Λ's off-diagonal), through ``Laplace.fit``'s one-backward-per-batch path.
- The sites: which weight matrices each adapter type contributes, and the one-line refusal of the others.

The float64 comparisons use GPT-2 (its LayerNorm and attention run in the model dtype). LLaMA's RMSNorm computes in
float32 whatever the model dtype, so a float64 LLaMA's backward is rounded to float32 (``autograd.grad`` is not even
linear in its vector beyond ~1e-7): LLaMA is compared at a float32 tolerance.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from torch.func import functional_call, jacrev

from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import ChoiceBatch, Laplace, LMBatch
from peft_bayes.posterior.curvature import Recorder, Site, adapter_sites
from peft_bayes.posterior.fisher import CurvatureAccumulator
from peft_bayes.posterior.likelihood import IGNORE
from peft_bayes.tiny import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # jacrev over sdpa
F64 = {"rtol": 1e-8, "atol": 1e-12}  # float64 end to end (GPT-2); entries of H are O(1)
# Mixed option counts (-inf padded scores), multi-token options (per-token normalised rows), right padding.
PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
]
LABELS = [1, 1, 0, 2]  # example 0's gold is not its MAP prediction (0): empirical ≠ Fisher at the argmax
LORA_WEIGHTS = ("lora_A", "lora_B")


# --- independent reference: own scoring code, torch.func Jacobians over the site weights -----------------------------
def weight_names(model, containers=LORA_WEIGHTS) -> list[str]:
    """The parameters that are adapter weight matrices, found by name (module order)."""
    pattern = re.compile(rf"\.({'|'.join(containers)})\.default\.weight$")
    return [n for n, _ in model.named_parameters() if pattern.search(n)]


def detached(model, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


def ref_scores(model, params: dict, batch: ChoiceBatch) -> torch.Tensor:
    """(B, K) summed (weighted) continuation log-probabilities, -inf where an example has fewer options."""
    logits = functional_call(model, params, (batch.input_ids,), {"attention_mask": batch.attention_mask}).logits
    logp = logits.log_softmax(-1)
    scored = batch.targets != IGNORE
    token_lp = torch.where(scored, logp.gather(-1, batch.targets.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    rows = token_lp.sum(-1) * batch.row_weight.to(logp.dtype)
    out = torch.full((batch.n_examples, int(batch.option.max()) + 1), float("-inf"), dtype=logp.dtype)
    return out.index_put((batch.example, batch.option), rows)


def ref_gold_nll(model, params, batch: ChoiceBatch) -> torch.Tensor:
    """(B,) -log softmax(scores)[gold] per example."""
    return -ref_scores(model, params, batch).log_softmax(-1).gather(1, batch.labels[:, None]).squeeze(1)


def ref_lm_nll(model, params, batch: LMBatch) -> torch.Tensor:
    """(B,) summed next-token NLL of each sequence's labelled tokens."""
    logits = functional_call(model, params, (batch.input_ids,), {"attention_mask": batch.attention_mask}).logits
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch.labels[:, 1:]
    lp = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return -torch.where(labels != IGNORE, lp, 0.0).sum(-1)


def flat_jacobian(fn, model, names, batch) -> torch.Tensor:
    """(*fn's output shape, P) Jacobian of ``fn(model, params, batch)`` w.r.t. the weights, row-major flattened."""
    jac = jacrev(fn, argnums=1)(model, detached(model, names), batch)
    return torch.cat([jac[n].flatten(jac[n].ndim - detached(model, [n])[n].ndim) for n in names], -1)


def ref_curvature(model, names, batches, fisher: str, likelihood: str = "choice") -> torch.Tensor:
    """Dense (P, P): Σ_n ∇ℓ_n ∇ℓ_nᵀ (empirical) or Σ_n J_nᵀ (diag(p) - p pᵀ) J_n (exact, J of the option scores)."""
    H = 0
    for batch in batches:
        if fisher == "empirical":
            fn = ref_gold_nll if likelihood == "choice" else ref_lm_nll
            grads = flat_jacobian(fn, model, names, batch)  # (B, P)
            H = H + grads.T @ grads
        else:
            J = flat_jacobian(ref_scores, model, names, batch)  # (B, K, P)
            p = ref_scores(model, detached(model, names), batch).softmax(-1)
            lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            H = H + torch.einsum("bkp,bkl,blq->pq", J, lam, J)
    return H.detach()  # (other adapter parameters, DoRA's magnitudes, still require grad)


# --- models ----------------------------------------------------------------------------------------------------------
def gpt2_lora(tok, use_dora: bool = False):
    base = build_tiny_model("gpt2", tok, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    config = LoraConfig(
        r=2, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, init_lora_weights=False, use_dora=use_dora
    )
    return get_peft_model(base, config).double().eval()


def llama_base(tok, **kw):
    return build_tiny_model("llama", tok, hidden_size=16, num_layers=1, num_heads=2, **kw)


def fit(model, batches, **options) -> Laplace:
    laplace = Laplace(model, prior_method="fixed", **options)
    laplace.fit(batches)
    return laplace


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    model = gpt2_lora(tiny_tokenizer)
    batches = list(PairScorer(model, tiny_tokenizer, PAIRS, 2, norm="tokens", labels=LABELS).batches())
    return model, batches


# --- full / diag against torch.func ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_full_and_diag_equal_dense_reference(gpt2, fisher):
    model, batches = gpt2
    names = weight_names(model)
    expected = ref_curvature(model, names, batches, fisher)
    assert expected.abs().max() > 0.1  # the adapter matters: B ≠ 0, so every site has a gradient
    full = fit(model, batches, structure="full", fisher=fisher)
    assert len(full.blocks) == 1
    torch.testing.assert_close(full.blocks[0].H, expected, **F64)
    diag = fit(model, batches, structure="diag", fisher=fisher)
    torch.testing.assert_close(torch.cat([b.d.flatten() for b in diag.blocks]), expected.diagonal(), **F64)
    last = fit(model, batches, structure="full", fisher=fisher, subset="last_layer")  # mlp.c_proj's A and B
    n = last.n_params
    assert n == sum(p.numel() for name, p in model.named_parameters() if "mlp.c_proj.lora_" in name)
    torch.testing.assert_close(last.blocks[0].H, expected[-n:, -n:], **F64)


@pytest.mark.parametrize(
    "structure,kfac", [("kron", "expand"), ("kron", "reduce"), ("diag", "expand"), ("full", "expand")]
)
def test_curvature_does_not_depend_on_the_batching(gpt2, tiny_tokenizer, structure, kfac):
    """One example per batch or all in one (other padding widths): the same sums, the same K-FAC token counts."""
    model, batches = gpt2
    one_batch = list(PairScorer(model, tiny_tokenizer, PAIRS, 4, norm="tokens", labels=LABELS).batches())
    singles = list(PairScorer(model, tiny_tokenizer, PAIRS, 1, norm="tokens", labels=LABELS).batches())
    assert len(one_batch) == 1 and len(singles) == len(PAIRS)
    fits = [fit(model, b, structure=structure, kfac=kfac, fisher="exact") for b in (one_batch, batches, singles)]
    for other in fits[1:]:
        for block, reference in zip(other.blocks, fits[0].blocks):
            for name in reference.state_dict():
                torch.testing.assert_close(block.state_dict()[name], reference.state_dict()[name], **F64)


def test_mc_fisher_estimates_the_exact_one(gpt2):
    """The mc Fisher (labels drawn from the model) is an unbiased estimate of the GGN: with 100 draws per example its
    error is a few percent, far below its distance from the empirical Fisher (gold labels)."""
    model, batches = gpt2
    names = weight_names(model)
    exact = ref_curvature(model, names, batches, "exact")
    empirical = ref_curvature(model, names, batches, "empirical")
    mc = fit(model, batches, structure="full", fisher="mc", fisher_samples=100, seed=3).blocks[0].H
    rel = lambda m: float((m - exact).norm() / exact.norm())  # noqa: E731
    assert rel(empirical) > 0.5
    assert rel(mc) < 0.2, rel(mc)


def test_lm_empirical_fisher_equals_dense_reference(gpt2, tiny_tokenizer):
    model, _ = gpt2
    texts = [("3+4=", " 7</s>"), ("The answer is", " false</s>"), ("5+1=", " 6 and 12</s>")]
    rows = []
    for prompt, response in texts:
        p_ids = tiny_tokenizer(prompt).input_ids
        r_ids = tiny_tokenizer(response, add_special_tokens=False).input_ids
        rows.append((p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids))
    width = max(len(ids) for ids, _ in rows)
    batch = LMBatch(
        torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]),
        torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in rows]),
    )
    expected = ref_curvature(model, weight_names(model), [batch], "empirical", likelihood="lm")
    laplace = fit(model, [batch], structure="full", fisher="empirical", likelihood="lm")
    torch.testing.assert_close(laplace.blocks[0].H, expected, **F64)
    assert laplace.loglik == pytest.approx(-float(ref_lm_nll(model, {}, batch).sum().detach()), rel=1e-12)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_llama_full_at_float32_norm_precision(tiny_tokenizer, adapter):
    """LLaMA (RMSNorm in float32, see the module docstring) and DoRA (its column norm is detached, as the paper
    says, so the module calls carry the whole gradient): the exact GGN at the float32 rounding of the norms."""
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=adapter == "dora")
    model = get_peft_model(llama_base(tiny_tokenizer), config).double().eval()
    batches = list(PairScorer(model, tiny_tokenizer, PAIRS[:3], 4, labels=LABELS[:3]).batches())
    expected = ref_curvature(model, weight_names(model), batches, "exact")
    laplace = fit(model, batches, structure="full", fisher="exact")
    torch.testing.assert_close(laplace.blocks[0].H, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


# --- K-FAC where it is exact -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_kron_of_one_token_is_the_exact_curvature(fisher, kfac):
    """One example, one token: the gradient of W is g aᵀ, so ∇W∇Wᵀ = g gᵀ ⊗ a aᵀ (and Σ_c g_c g_cᵀ ⊗ a aᵀ for the
    exact Fisher's K vectors): K-FAC is exact in both modes."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)).double()
    sites = [Site("0", net[0]), Site("2", net[2])]
    x = torch.randn(1, 1, 4, generator=gen, dtype=torch.float64)
    gold = torch.tensor([[2]])
    mask, unit = torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)

    kron = CurvatureAccumulator(sites, "kron", kfac == "reduce", torch.float64)
    with Recorder(sites) as rec:
        f = net(x)  # (1, 1, 5)
        p = f.detach().softmax(-1)
        kron.forward(rec, mask, unit, 1)
        if fisher == "empirical":
            vectors = [p - nn.functional.one_hot(gold, 5)]
        else:
            vectors = [p[..., c : c + 1].sqrt() * (torch.eye(5, dtype=p.dtype)[c] - p) for c in range(5)]
        for v in vectors:
            kron.backward(rec, f, v, 1.0, mask, unit, 1)

    weights = {"0.weight": net[0].weight.detach(), "2.weight": net[2].weight.detach()}
    logits = lambda w: functional_call(net, w, (x,))[0, 0]  # noqa: E731
    for i, name in enumerate(weights):
        if fisher == "empirical":
            loss = lambda w: -logits(w).log_softmax(-1)[gold[0, 0]]  # noqa: E731
            grad = jacrev(loss)(weights)[name].flatten()
            expected = torch.outer(grad, grad)
        else:
            J = jacrev(logits)(weights)[name].flatten(1)  # (5, out·in)
            expected = J.T @ (torch.diag(p[0, 0]) - torch.outer(p[0, 0], p[0, 0])) @ J
        torch.testing.assert_close(kron.blocks()[i].to_dense(), expected, rtol=1e-10, atol=1e-14)


def deep_linear(seed: int = 0):
    dims = [4, 3, 5, 2]
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(i, o, bias=False) for i, o in zip(dims, dims[1:]))).double()


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_kfac_of_a_deep_linear_network_is_its_closed_form(kfac):
    """A deep linear network, N sequences of T tokens (the weights shared over tokens), MSE with σ = 1: the exact
    Fisher's vectors are the output unit vectors at every real token, and the gradient of f_{n,t} w.r.t. layer l's W is
    B ⊗ a_{n,t}ᵀ with B the product of the later layers' weights. Hence (Eschenhagen et al. 2023)

    - expand: the GGN Σ_{n,t} Jᵀ J = (Bᵀ B) ⊗ Σ_{n,t} a aᵀ over real tokens, which K-FAC expand equals;
    - reduce: (Bᵀ B) ⊗ Σ_n s_n s_nᵀ with s_n = Σ_t a_{n,t}, the GGN of a loss on the summed outputs Σ_t f_{n,t},
      which K-FAC reduce equals (every sequence of the same length) and which differs from the expand form.

    The expand case pads one sequence: random inputs at its padded positions, vectors zero there (the loss ignores
    them), which must not reach A.
    """
    net = deep_linear()
    N, T = 3, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones(N, T, dtype=torch.long)
    if kfac == "expand":
        mask[1, 2:] = 0
    unit = torch.arange(N)
    sites = [Site(str(i), m) for i, m in enumerate(net)]
    acc = CurvatureAccumulator(sites, "kron", kfac == "reduce", torch.float64)
    with Recorder(sites) as rec:
        f = net(x)  # (N, T, 2)
        acc.forward(rec, mask, unit, N)
        for c in range(2):
            v = torch.zeros_like(f)
            v[..., c] = mask
            acc.backward(rec, f, v, 1.0, mask, unit, N)
    blocks = acc.blocks()

    a = x
    weights = [m.weight.detach() for m in net]
    real = mask.bool()
    for layer, W in enumerate(weights):
        B = torch.eye(W.shape[0], dtype=torch.float64)
        for later in weights[layer + 1 :]:
            B = later @ B
        if kfac == "expand":
            a_real = a[real]  # (tokens, in)
            closed = torch.kron(B.T @ B, a_real.T @ a_real)
            s = (a * mask[..., None]).sum(1)
            other = torch.kron(B.T @ B, s.T @ s)  # the reduce form
        else:
            s = a.sum(1)  # (N, in)
            closed = torch.kron(B.T @ B, s.T @ s)
            other = torch.kron(B.T @ B, a.flatten(0, 1).T @ a.flatten(0, 1))  # the expand form
        # the closed form is the GGN: from jacrev of f (expand, real tokens) or of Σ_t f (reduce)
        params = {f"{i}.weight": w for i, w in enumerate(weights)}
        if kfac == "expand":
            J = jacrev(lambda p: functional_call(net, p, (x,))[real])(params)[f"{layer}.weight"].flatten(-2)
        else:
            J = jacrev(lambda p: functional_call(net, p, (x,)).sum(1))(params)[f"{layer}.weight"].flatten(-2)
        J = J.reshape(-1, J.shape[-1])
        torch.testing.assert_close(J.T @ J, closed, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(blocks[layer].to_dense(), closed, rtol=1e-10, atol=1e-12)
        assert (other - closed).abs().max() > 0.1 * closed.abs().max()
        a = a @ W.T


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_kron_of_rows_sharing_one_token_is_exact(gpt2, fisher):
    """One example whose K option rows are [context token, option token] with the option token masked out (it is
    only a target; its position's output is never used, and causal attention keeps it from position 0). Every site
    then sees the same single activation a in every row, and the gradient of row k's score is J_k = g_k ⊗ a. So

    - reduce (token means of a, per-example sums of g): the example's gradient Σ_k v_k J_k = (Σ_k v_k g_k) ⊗ a is
      one Kronecker product, and K-FAC reduce equals the site blocks of the dense curvature exactly;
    - expand (every row's token its own sample): Σ_k w_k J_k J_kᵀ with w_k = Σ_v v_k², i.e. the curvature with
      Λ's off-diagonal dropped (w = diag(p) - p² for exact, (p - e_y)² for empirical), which differs from the first.
    """
    model, _ = gpt2
    options = torch.tensor([26, 27, 20])
    K = len(options)
    batch = ChoiceBatch(
        input_ids=torch.stack([torch.full((K,), 22), options], 1),
        attention_mask=torch.tensor([[1, 0]] * K),
        targets=torch.stack([options, torch.full((K,), IGNORE)], 1),
        row_weight=torch.ones(K),
        example=torch.zeros(K, dtype=torch.long),
        option=torch.arange(K),
        labels=torch.tensor([1]),
        index=torch.tensor([0]),
    )
    names = weight_names(model)
    dense = ref_curvature(model, names, [batch], fisher)
    J = flat_jacobian(ref_scores, model, names, batch)[0]  # (K, P)
    p = ref_scores(model, detached(model, names), batch)[0].softmax(-1)
    w = p * (1 - p) if fisher == "exact" else (p - nn.functional.one_hot(batch.labels[0], K)).pow(2)
    diagonal_lambda = torch.einsum("k,kp,kq->pq", w, J, J)
    sizes = [s.weight.numel() for s in adapter_sites(model)]
    spans = [slice(o, o + n) for o, n in zip(torch.tensor([0, *sizes]).cumsum(0).tolist(), sizes)]
    reduce = fit(model, [batch], structure="kron", kfac="reduce", fisher=fisher).blocks
    expand = fit(model, [batch], structure="kron", kfac="expand", fisher=fisher).blocks
    for span, red, exp in zip(spans, reduce, expand):
        block = dense[span, span]
        assert block.abs().max() > 1e-3
        torch.testing.assert_close(red.to_dense(), block, **F64)
        torch.testing.assert_close(exp.to_dense(), diagonal_lambda[span, span], **F64)
        assert (exp.to_dense() - block).abs().max() > 1e-3 * block.abs().max()


# --- sites -----------------------------------------------------------------------------------------------------------
def _site_case(kind: str, tok):
    from peft_bayes.tuners import BayesLoraConfig, BottleneckConfig, ParallelAdapterConfig

    torch.manual_seed(0)
    if kind == "gpt2-lora":
        return gpt2_lora(tok), LORA_WEIGHTS, 4
    if kind in ("llama-lora", "llama-dora"):
        cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=kind == "llama-dora")
        return get_peft_model(llama_base(tok), cfg), LORA_WEIGHTS, 4
    if kind == "bayeslora":
        cfg = BayesLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return get_peft_model(llama_base(tok), cfg), LORA_WEIGHTS, 4
    if kind == "bottleneck":
        cfg = BottleneckConfig(task_type="CAUSAL_LM", bottleneck_size=4, scaling="learned", init_weights=False)
        return get_peft_model(llama_base(tok), cfg), ("bottleneck_down", "bottleneck_up"), 4  # o_proj, down_proj
    cfg = ParallelAdapterConfig(task_type="CAUSAL_LM", bottleneck_size=4, init_weights=False)
    return get_peft_model(llama_base(tok), cfg), ("parallel_down", "parallel_up"), 6  # q, k, v


@pytest.mark.parametrize("kind", ["gpt2-lora", "llama-lora", "llama-dora", "bayeslora", "bottleneck", "parallel"])
def test_sites_are_the_adapter_weight_matrices(tiny_tokenizer, kind):
    model, containers, count = _site_case(kind, tiny_tokenizer)
    params = dict(model.named_parameters())
    expected = weight_names(model, containers)
    sites = adapter_sites(model)
    assert len(sites) == count
    assert [s.name + ".default.weight" for s in sites] == expected
    assert all(s.weight is params[n] and isinstance(s.module, nn.Linear) for s, n in zip(sites, expected))
    # never DoRA's magnitudes, BayesLoRA's rho or a learned scale
    others = {n for n, p in params.items() if p.requires_grad} - set(expected)
    assert others == {n for n in others if re.search(r"magnitude|rho|_scale\.", n)}
    last = adapter_sites(model, "last_layer")
    assert [s.name for s in last] == [s.name for s in sites[-2:]]
    assert len({s.name.rsplit(".", 1)[0] for s in last}) == 1


def test_bayeslora_mean_pass_is_recorded_and_exact(tiny_tokenizer):
    """BayesLoRA's mean pass calls lora_A / lora_B as modules, so the hooks see it: the fit works, and its curvature
    over the means is the exact GGN (float32 tolerance: a LLaMA base, see the module docstring)."""
    from peft_bayes.tuners import BayesLoraConfig

    torch.manual_seed(0)
    cfg = BayesLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(llama_base(tiny_tokenizer), cfg).double().eval()
    with torch.no_grad():
        for name in weight_names(model, ("lora_B",)):
            dict(model.named_parameters())[name].normal_(0, 0.5)  # B = 0 at init: the A sites would have no gradient
    batches = list(PairScorer(model, tiny_tokenizer, PAIRS[:3], 4, labels=LABELS[:3]).batches())
    expected = ref_curvature(model, weight_names(model), batches, "exact")
    H = fit(model, batches, structure="full", fisher="exact").blocks[0].H
    assert H.abs().max() > 0.1
    torch.testing.assert_close(H, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_tokenizer):
    from peft_bayes.tiny import save_tiny_model

    # bitsandbytes' CPU 4-bit path packs blocks of 64 inputs: the width must be a multiple of 64.
    root = tmp_path_factory.mktemp("laplace-quant")
    return save_tiny_model(root, "llama", tokenizer=tiny_tokenizer, hidden_size=64, num_layers=1, num_heads=4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base(quantized_dir, tiny_tokenizer, bits):
    """LoRA over a 4-bit / 8-bit base: the sites are the float32 LoRA factors and the diag empirical Fisher equals
    the squared per-example gradients (plain autograd over the real parameters), at float32 tolerance."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_bayes.models import disable_bnb_cpu_repacking

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=q).eval()
    disable_bnb_cpu_repacking(base)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer"), quantized)
    sites = adapter_sites(model)
    names = weight_names(model)
    assert [s.name + ".default.weight" for s in sites] == names and len(sites) == 4
    batches = list(PairScorer(model, tiny_tokenizer, PAIRS[:3], 4, labels=LABELS[:3]).batches())
    laplace = fit(model, batches, structure="diag", fisher="empirical")
    params = [dict(model.named_parameters())[n] for n in names]
    expected = 0
    for batch in batches:
        nll = ref_gold_nll(model, {}, batch)
        for n in range(batch.n_examples):
            grads = torch.autograd.grad(nll[n], params, retain_graph=True)
            expected = expected + torch.cat([g.flatten() for g in grads]).pow(2)
    got = torch.cat([b.d.flatten() for b in laplace.blocks])
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["prefix", "prompt", "ia3"])
def test_adapters_without_weight_matrices_are_refused(tiny_tokenizer, kind):
    config = {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "ia3": IA3Config(
            task_type="CAUSAL_LM", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    }[kind]
    model = get_peft_model(llama_base(tiny_tokenizer), config)
    peft_type = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ia3": "IA3"}[kind]
    for call in (lambda: adapter_sites(model), lambda: Laplace(model)):
        with pytest.raises(InputError, match=f"needs an adapter with weight matrices .* is {peft_type}") as err:
            call()
        assert "\n" not in str(err.value)


def test_unknown_subset_names_the_argument(gpt2):
    with pytest.raises(InputError, match="^subset must be one of all/last_layer, got 'first'"):
        adapter_sites(gpt2[0], "first")


def test_recorder_restores_requires_grad(gpt2):
    model, _ = gpt2
    sites = adapter_sites(copy.deepcopy(model))
    sites[0].weight.requires_grad_(False)
    with Recorder(sites):
        assert all(s.weight.requires_grad for s in sites)
    assert [s.weight.requires_grad for s in sites] == [False, True, True, True]


def test_last_layer_is_the_head_adapter_when_the_head_is_adapted(tiny_tokenizer):
    """Laplace-LoRA's last_layer is the output head's adapter: with lm_head among the targets it comes last in module
    order, so subset last_layer is exactly its A and B (and without a head adapter, the last adapted module's)."""
    base = llama_base(tiny_tokenizer, tie_word_embeddings=False)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(base, config).double().eval()
    last = adapter_sites(model, "last_layer")
    assert [s.name for s in last] == ["base_model.model.lm_head.lora_A", "base_model.model.lm_head.lora_B"]
    assert len(adapter_sites(model)) == 2 * 2 + 2  # q and v of the one block, and the head
