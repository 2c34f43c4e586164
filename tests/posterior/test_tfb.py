"""Training-free Bayesianization (``posterior.tfb``): a trained LoRA turned into a BayesLoRA adapter.

Checked against float64 computations of our own: the rotated factors reproduce B A (SVD oracle: torch.linalg on the
original B), the mean pass reproduces the LoRA's logits, the saved rho encode sigma / d_i exactly, the sigma search
stops at the threshold (its NLLs recomputed through ``BayesLoraPosterior``, not through tfb's own loop), and a saved
adapter loads back as BayesLoRA with the same posterior. A tiny float64 GPT-2 (LoRA r = 2 on the Conv1D ``c_attn``
and ``mlp.c_proj``, B != 0 from ``init_lora_weights=False``) runs in float64 end to end.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file

from peft_bayes import BayesLoraConfig, BottleneckConfig
from peft_bayes.errors import InputError
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import BayesLoraPosterior, LMBatch, sample_seed
from peft_bayes.posterior.likelihood import choice_nll
from peft_bayes.posterior.tfb import (
    SINGULAR_FLOOR,
    TFB_CONFIG_NAME,
    bayesianize,
    bisection_steps,
    inverse_scales,
    load_tfb_result,
    rotate_factors,
    save_tfb,
    search_sigma,
)
from peft_bayes.tiny import build_tiny_model
from peft_bayes.tuners.bayeslora import bayes_layers

F64 = {"rtol": 1e-10, "atol": 1e-12}
TARGETS = ["c_attn", "mlp.c_proj"]
PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
]
LABELS = [0, 0, 1, 2]
# On this model the expected NLL rises monotonically over BOUNDS, crossing (1 + EPSILON) x NLL(mean) near sigma 0.03
# (it is not monotone beyond: at sigma 10 it is back under the threshold).
EPSILON, BOUNDS, TOL, SAMPLES = 0.05, (1e-3, 0.2), 0.02, 3


def lora_model(tokenizer, seed: int = 0, **config):
    """A fresh float64 GPT-2 with a LoRA adapter whose B is random (TFB consumes the model it is given)."""
    base = build_tiny_model("gpt2", tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(seed)
    options = {"r": 2, "target_modules": TARGETS, "fan_in_fan_out": True, "init_lora_weights": False, **config}
    return get_peft_model(base, LoraConfig(**options)).double().eval()


def anchors(model, tokenizer) -> list:
    return list(PairScorer(model, tokenizer, PAIRS, 2, labels=LABELS).batches())


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["3+4= 7", "The answer is true"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def posterior_nll(model, batches, samples: int, seed: int) -> float:
    """Expected NLL per example through BayesLoraPosterior's samples (the oracle for tfb's own loop)."""
    posterior, count, total = (
        BayesLoraPosterior(model, draw="pass"),
        sum(int((b.labels >= 0).sum()) for b in batches),
        0.0,
    )
    for index in range(samples):
        with posterior.sample(sample_seed(seed, index)), torch.no_grad():
            total += sum(float(choice_nll(model, b)) for b in batches)
    return total / (samples * count)


def write_std(model, factors, sigma: float) -> None:
    """rho = sqrt(sigma / max(d_i, floor)) written by the test itself (std_param 'square')."""
    for name, layer in bayes_layers(model):
        d = torch.linalg.svdvals(factors[name][1])
        std = sigma / d.clamp_min(SINGULAR_FLOOR * d.max())
        with torch.no_grad():
            layer.bayeslora_rho["default"].copy_(std.sqrt()[:, None].expand_as(layer.bayeslora_rho["default"]))


@pytest.fixture(scope="module")
def tfb(tiny_tokenizer):
    """(original factors and logits, anchor batches, Bayesianized model, result, progress calls)."""
    model = lora_model(tiny_tokenizer)
    factors, before = lora_factors(model), logits(model, tiny_tokenizer)
    batches = anchors(model, tiny_tokenizer)
    calls = []
    bayes, result = bayesianize(
        model,
        batches,
        epsilon=EPSILON,
        sigma_bounds=BOUNDS,
        samples=SAMPLES,
        seed=3,
        tolerance=TOL,
        progress=lambda done, total: calls.append((done, total)),
    )
    return factors, before, batches, bayes, result, calls


# --- the rotation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, r, rank", [(7, 3, 3), (2, 4, 2), (6, 3, 2)], ids=["thin", "out<r", "rank-deficient"])
def test_rotation_keeps_the_product(out, r, rank):
    gen = torch.Generator().manual_seed(out * 10 + r)
    b = torch.randn(out, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, r, generator=gen).double()
    a = torch.randn(r, 5, generator=gen, dtype=torch.float64)
    a_rot, b_rot, d = rotate_factors(a.float(), b.float())
    a32, b32 = a.float().double(), b.float().double()
    torch.testing.assert_close(b_rot @ a_rot, b32 @ a32, **F64)
    # B' = U diag(d): orthogonal columns of norms d, d the singular values of B (descending, zero-padded to r).
    torch.testing.assert_close(b_rot.T @ b_rot, torch.diag(d**2), rtol=1e-10, atol=1e-10)
    expected = torch.zeros(r, dtype=torch.float64)
    expected[: min(out, r)] = torch.linalg.svdvals(b32)
    torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-10)
    assert (d[:-1] >= d[1:]).all() and (d[rank:] < 1e-6 * d[0]).all()  # zero up to B's float32 rounding
    assert (inverse_scales(d)[rank:] == 1 / (SINGULAR_FLOOR * d[0])).all()  # clamped: a finite std
    # A' = Vᵀ A with V orthogonal: A' A'ᵀ has A Aᵀ's spectrum.
    torch.testing.assert_close(torch.linalg.eigvalsh(a_rot @ a_rot.T), torch.linalg.eigvalsh(a32 @ a32.T), **F64)


def test_zero_singular_values_are_clamped():
    scales = inverse_scales(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    assert scales.tolist() == [0.25, 1.0, 1.0 / (SINGULAR_FLOOR * 4.0)]
    assert torch.isfinite(scales).all()


# --- the Bayesianized model ------------------------------------------------------------------------------------------
def test_mean_is_the_original_lora(tfb, tiny_tokenizer):
    factors, before, _, bayes, _, _ = tfb
    layers = dict(bayes_layers(bayes))
    assert set(layers) == set(factors)
    for name, (a, b) in factors.items():
        layer = layers[name]
        product = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(product, b @ a, **F64)
        assert not torch.allclose(layer.lora_A["default"].weight, a)  # really rotated
    assert isinstance(bayes.peft_config["default"], BayesLoraConfig)
    torch.testing.assert_close(logits(bayes, tiny_tokenizer), before, **F64)  # eval mode: the mean


def test_sigma_over_singular_values_in_the_saved_rho(tfb, tmp_path):
    factors, _, _, bayes, result, _ = tfb
    folder = save_tfb(bayes, result, str(tmp_path / "tfb"))
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    rhos = {k: v for k, v in saved.items() if "bayeslora_rho" in k}
    assert len(rhos) == len(factors)
    for name, (_, b) in factors.items():
        key = next(k for k in rhos if k.startswith(name + "."))
        rho = rhos[key]
        d = torch.linalg.svdvals(b)  # full rank here: no clamping
        torch.testing.assert_close(rho**2, (result.sigma / d)[:, None].expand_as(rho), **F64)


@pytest.mark.parametrize("std_param", ["square", "softplus"])
def test_rho_parametrisations(tiny_tokenizer, std_param):
    model = lora_model(tiny_tokenizer, seed=1)
    factors = lora_factors(model)
    bayes, result = bayesianize(
        model,
        anchors(model, tiny_tokenizer),
        epsilon=math.inf,
        sigma_bounds=(0.5, 0.5),
        samples=1,
        std_param=std_param,
    )
    assert result.sigma == 0.5 and bayes.peft_config["default"].std_param == std_param
    for name, layer in bayes_layers(bayes):
        d = torch.linalg.svdvals(factors[name][1])
        std = layer.posterior_std("default")
        torch.testing.assert_close(std, (0.5 / d)[:, None].expand_as(std), **F64)


@pytest.mark.parametrize("extra", [{"lora_bias": True}, {"modules_to_save": ["ln_f"]}], ids=["lora_bias", "saved"])
def test_other_trained_weights_are_kept(tiny_tokenizer, tmp_path, extra):
    """B's bias (lora_bias) and modules_to_save are trained too: the mean, saved and loaded, keeps them."""
    model = lora_model(tiny_tokenizer, **extra)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default.bias" in name or "modules_to_save.default" in name:
                param.add_(torch.randn_like(param))
    before = logits(model, tiny_tokenizer)
    bayes, result = bayesianize(model, anchors(model, tiny_tokenizer), epsilon=math.inf, sigma_bounds=(0.5, 0.5))
    torch.testing.assert_close(logits(bayes, tiny_tokenizer), before, **F64)
    base = build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2).double()
    loaded = PeftModel.from_pretrained(base, save_tfb(bayes, result, str(tmp_path / "tfb"))).eval()
    torch.testing.assert_close(logits(loaded, tiny_tokenizer), before, **F64)


def test_search_stops_at_the_threshold(tfb):
    factors, _, batches, bayes, result, _ = tfb
    assert BOUNDS[0] < result.sigma < BOUNDS[1] and not result.at_upper_bound
    assert result.threshold == pytest.approx((1 + EPSILON) * result.nll_mean, rel=1e-15)
    # NLL(sigma*) recomputed through the posterior: within the threshold, and equal to what the search saw.
    at_sigma = posterior_nll(bayes, batches, SAMPLES, 3)
    assert at_sigma == pytest.approx(result.nll_at_sigma, rel=1e-12)
    assert at_sigma <= result.threshold
    # One tolerance step further breaks it; the bracket's upper end did too.
    write_std(bayes, factors, result.sigma * (1 + TOL))
    assert posterior_nll(bayes, batches, SAMPLES, 3) > result.threshold
    write_std(bayes, factors, result.sigma_upper)
    assert posterior_nll(bayes, batches, SAMPLES, 3) == pytest.approx(result.nll_upper, rel=1e-12)
    assert result.nll_upper > result.threshold and result.sigma < result.sigma_upper <= result.sigma * (1 + TOL)
    write_std(bayes, factors, result.sigma)  # back to the fixture's state
    assert result.search == "interpolation" and result.n_evals < 2 + bisection_steps(BOUNDS, TOL)


def test_interpolation_finds_the_bisection_sigma(tfb, tiny_tokenizer):
    """The default search and plain bisection on log sigma bracket the same root: sigma within the tolerance."""
    _, _, _, _, result, _ = tfb
    model = lora_model(tiny_tokenizer)
    settings = {"epsilon": EPSILON, "sigma_bounds": BOUNDS, "samples": SAMPLES, "seed": 3, "tolerance": TOL}
    _, bisected = bayesianize(model, anchors(model, tiny_tokenizer), search="bisection", **settings)
    assert bisected.n_evals == 2 + bisection_steps(BOUNDS, TOL) and bisected.nll_mean == result.nll_mean
    assert abs(math.log(result.sigma / bisected.sigma)) <= math.log1p(TOL)


def test_mean_nll_is_the_loras(tfb):
    _, _, batches, bayes, result, _ = tfb
    count = sum(int((b.labels >= 0).sum()) for b in batches)
    with torch.no_grad():
        mean = sum(float(choice_nll(bayes, b)) for b in batches) / count
    assert result.nll_mean == pytest.approx(mean, rel=1e-12)


def test_progress_counts(tfb):
    """One tick per pass over the anchors: the mean's, then SAMPLES per evaluation; announced for a bisection."""
    _, _, _, _, result, calls = tfb
    total, passes = 1 + SAMPLES * (2 + bisection_steps(BOUNDS, TOL)), 1 + SAMPLES * result.n_evals
    assert calls == [(i, total) for i in range(1, passes + 1)] + [(total, total)]


def test_upper_bound_when_every_sigma_passes(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    batches, calls = anchors(model, tiny_tokenizer), []
    _, result = bayesianize(
        model, batches, epsilon=EPSILON, sigma_bounds=(1e-3, 0.02), samples=2, progress=lambda *c: calls.append(c)
    )
    assert result.sigma == 0.02 and result.at_upper_bound and result.n_evals == 1
    assert result.nll_at_sigma <= result.threshold
    total = 1 + 2 * (2 + bisection_steps((1e-3, 0.02), 0.02))  # announced for the full search
    assert calls == [(i, total) for i in range(1, 4)] + [(total, total)]


def test_lm_anchor_batches(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    enc = tiny_tokenizer(["3+4= 7", "The answer is true", "5+1= 6"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    batch = LMBatch(enc["input_ids"], enc["attention_mask"], labels)
    _, result = bayesianize(model, [batch], epsilon=0.01, sigma_bounds=(1e-4, 10.0), samples=2)
    assert result.unit == "token" and result.n_anchor == int((labels[:, 1:] != -100).sum())
    assert result.nll_at_sigma <= result.threshold < result.nll_upper


# --- the search on its own -------------------------------------------------------------------------------------------
def test_search_sigma_on_a_known_curve():
    seen = []

    def f(s):
        seen.append(s)
        return s * s

    sigma, value, upper, value_upper, n = search_sigma(f, 2.0, (1e-3, 1e3), 0.01)
    assert sigma <= math.sqrt(2) < upper <= sigma * 1.01 and value == sigma**2 and value_upper == upper**2
    assert n == len(seen) == 2 + bisection_steps((1e-3, 1e3), 0.01)
    assert search_sigma(f, 2.0, (0.1, 1.2), 0.01)[:3] == (1.2, 1.44, None)
    assert search_sigma(lambda s: math.nan if s > 1 else 0.0, 1.0, (0.5, 4.0), 0.01)[0] <= 1.0  # NaN = failing
    with pytest.raises(InputError, match="sigma_bounds: even sigma=2 gives anchor NLL 4"):
        search_sigma(f, 2.0, (2.0, 100.0), 0.01)


# --- persistence -----------------------------------------------------------------------------------------------------
def test_save_load_gives_the_same_posterior(tfb, tiny_tokenizer, tmp_path):
    _, _, batches, bayes, result, _ = tfb
    folder = save_tfb(bayes, result, str(tmp_path / "adapter"))
    base = build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=1, num_heads=2).double()
    loaded = PeftModel.from_pretrained(base, folder).eval()
    assert isinstance(loaded.peft_config["default"], BayesLoraConfig)
    assert load_tfb_result(folder) == result
    with open(os.path.join(folder, TFB_CONFIG_NAME), encoding="utf-8") as f:
        assert json.load(f)["sigma"] == result.sigma
    for seed in (0, 7):
        outs = []
        for model in (bayes, loaded):
            with BayesLoraPosterior(model).sample(seed):
                outs.append(logits(model, tiny_tokenizer))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    with BayesLoraPosterior(bayes).sample(0):
        assert not torch.allclose(logits(bayes, tiny_tokenizer), outs[0])  # seeds give different samples
    assert posterior_nll(loaded, batches, SAMPLES, 3) == pytest.approx(result.nll_at_sigma, rel=1e-12)
    save_tfb(bayes, result, folder)  # overwriting an earlier save works, and leaves no temporary folder
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_load_tfb_result_needs_the_file(tmp_path):
    with pytest.raises(InputError, match="no tfb_config.json there"):
        load_tfb_result(str(tmp_path))


# --- where TFB does not apply ----------------------------------------------------------------------------------------
def other_adapter(tokenizer, config):
    base = build_tiny_model("gpt2", tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda t: other_adapter(t, BottleneckConfig(target_modules=["mlp.c_proj"], bottleneck_size=4)),
            "is BOTTLENECK",
        ),
        (lambda t: other_adapter(t, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)), "is PREFIX"),
        (lambda t: lora_model(t, use_dora=True), "DoRA"),
        (lambda t: lora_model(t, init_lora_weights=True), "all zeros: TFB needs a trained LoRA"),
        (lambda t: lora_model(t).base_model.model, "needs a PeftModel"),
    ],
    ids=["bottleneck", "prefix", "dora", "untrained", "not-peft"],
)
def test_not_a_trained_lora(tiny_tokenizer, make, message):
    model = make(tiny_tokenizer)
    batches = list(PairScorer(model, tiny_tokenizer, PAIRS, 2, labels=LABELS).batches())
    calls = []
    with pytest.raises(InputError, match=message):
        bayesianize(model, batches, progress=lambda *c: calls.append(c))
    assert calls == []  # refused before any forward pass


def test_bad_anchor_sets(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    before = logits(model, tiny_tokenizer)
    batches = anchors(model, tiny_tokenizer)
    with pytest.raises(InputError, match="anchor set .* it is empty"):
        bayesianize(model, [])
    unlabelled = [b.__class__(**{**b.__dict__, "labels": torch.full_like(b.labels, -1)}) for b in batches]
    with pytest.raises(InputError, match="no labelled example"):
        bayesianize(model, unlabelled)
    lm = LMBatch(batches[0].input_ids, batches[0].attention_mask, batches[0].input_ids)
    with pytest.raises(InputError, match="all be ChoiceBatch or all LMBatch"):
        bayesianize(model, [batches[0], lm])
    broken = [b.__class__(**{**b.__dict__, "row_weight": torch.full_like(b.row_weight, math.nan)}) for b in batches]
    with pytest.raises(InputError, match="not finite"):
        bayesianize(model, broken)
    with pytest.raises(InputError, match="sigma_bounds must be"):
        bayesianize(model, batches, sigma_bounds=(0.0, 1.0))
    # every error so far came before the model was touched: it is still the LoRA it was
    assert model.peft_config["default"].peft_type == "LORA"
    torch.testing.assert_close(logits(model, tiny_tokenizer), before, rtol=0, atol=0)
    with pytest.raises(InputError, match="even sigma="):  # epsilon 0 and a large lower bound: nothing passes
        bayesianize(model, batches, epsilon=0.0, sigma_bounds=(3.0, 10.0))
