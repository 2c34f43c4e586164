"""BayesLoRA (BLoB) as a PEFT tuner, against independent computations.

- KL against ``torch.distributions.kl_divergence`` in float64 (both std parametrisations, both factors), and its
  gradient against autograd through that reference.
- The initial sigma lies in BLoB's [eps^2 / 2, eps^2] and u = sqrt(sigma) is uniform there.
- A layer's sampled forward equals ``base(x) + s * B (M + sigma * E) x`` computed by hand in float64 from its
  weights and the same E, on nn.Linear (LLaMA), GPT-2's Conv1D and bitsandbytes int8 / NF4 / FP4 layers (whose
  reference uses the quantized layer's own output).
- Mean mode equals plain PEFT LoRA with the same weights; sampling modes, ``posterior_sample`` and their restores.
- ``to_lora`` loads in vanilla PEFT in a subprocess that never imports peft_bayes; merging; save / load; config
  validation; several adapters.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_bayes
from peft_bayes import BayesLoraConfig, posterior_sample, sampling
from peft_bayes.kernels.sampled_lora import draw_noise
from peft_bayes.tiny import build_tiny_model, save_tiny_model
from peft_bayes.tuners.bayeslora import bayes_layers
from peft_bayes.tuners.bayeslora import layer as bayes_layer

IDS = torch.tensor([[5, 17, 42, 99, 7, 120, 33], [64, 8, 8, 250, 31, 2, 77]])
BAYES_FIELDS = ("prior_std", "init_std", "std_param", "flipout", "kl_schedule", "kl_weight", "kl_anneal_steps",
                "bayesian_factor")  # fmt: skip


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """These tests replay torch's own draws (``draw_noise``): the reference path. The fused Triton path, whose noise
    comes from Philox, is tested against the same references in tests/kernels/test_sampled_lora_triton.py."""
    monkeypatch.setenv("PEFT_BAYES_KERNEL", "reference")


@pytest.fixture(scope="module")
def bases(tiny_tokenizer):
    return {a: build_tiny_model(a, tiny_tokenizer, hidden_size=32, num_heads=4) for a in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("bayeslora-bases")
    return {
        a: save_tiny_model(root / a, a, tokenizer=tiny_tokenizer, hidden_size=32, num_heads=4)
        for a in ("llama", "gpt2")
    }


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory, tiny_tokenizer):
    # bitsandbytes' CPU 4-bit path packs blocks of 64 inputs: the width must be a multiple of 64.
    return save_tiny_model(
        tmp_path_factory.mktemp("bayeslora-quant"), "llama", tokenizer=tiny_tokenizer, hidden_size=64
    )


def config(**kw):
    kw = {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **kw}
    return BayesLoraConfig(**kw)


def perturb(model, adapter="default", seed=1, sigma=(0.05, 0.3)):
    """Non-zero B, a random A, and sigma uniform in ``sigma`` (far larger than the init, so sampling shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bayes_layers(model):
            if adapter not in layer.bayeslora_rho:
                continue
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            rho = layer.bayeslora_rho[adapter]
            std = torch.empty(rho.shape).uniform_(*sigma, generator=gen)
            rho.copy_(bayes_layer.rho_from_std(std, layer.bayeslora_spec[adapter].std_param))
    return model


def make(bases, arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(bases[arch]), config(**kw))
    return perturb(model).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sigma_of(rho, std_param):
    """sigma from rho, written independently of the library."""
    rho = rho.detach().double()
    return rho**2 if std_param == "square" else torch.log1p(torch.exp(rho))


# --------------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("std_param", ["square", "softplus"])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_kl_matches_torch_distributions(bases, std_param, factor):
    model = make(bases, std_param=std_param, bayesian_factor=factor, prior_std=0.3)
    layers = bayes_layers(model)
    assert len(layers) == 4  # q_proj, v_proj in 2 blocks
    leaves, ref = [], torch.zeros((), dtype=torch.float64)
    for _, layer in layers:
        mean = (layer.lora_A if factor == "A" else layer.lora_B)["default"].weight
        rho = layer.bayeslora_rho["default"]
        assert rho.shape == mean.shape
        m64 = mean.detach().double().requires_grad_()
        r64 = rho.detach().double().requires_grad_()
        s64 = r64**2 if std_param == "square" else torch.log1p(torch.exp(r64))
        ref = ref + kl_divergence(Normal(m64, s64), Normal(torch.zeros_like(m64), 0.3)).sum()
        leaves += [(mean, m64), (rho, r64)]
    kl = model.kl_divergence()
    assert kl.dim() == 0 and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=0)
    assert ref.item() > 1.0

    kl.backward()
    ref.backward()
    for p, p64 in leaves:
        assert p.grad is not None and p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    # The other factor is not in the KL.
    other = layers[0][1].lora_B if factor == "A" else layers[0][1].lora_A
    assert other["default"].weight.grad is None


@pytest.mark.parametrize("std_param", ["square", "softplus"])
def test_rho_init_blob(bases, tiny_tokenizer, std_param):
    eps = 0.05
    base = build_tiny_model("llama", tiny_tokenizer, hidden_size=64, num_heads=4)
    torch.manual_seed(0)
    model = get_peft_model(base, config(r=8, std_param=std_param, init_std=eps))
    sig = torch.cat(
        [sigma_of(layer.bayeslora_rho["default"], std_param).flatten() for _, layer in bayes_layers(model)]
    )
    n = sig.numel()
    assert n == 4 * 8 * 64
    assert sig.min() >= eps**2 / 2 * (1 - 1e-5) and sig.max() <= eps**2 * (1 + 1e-5)
    # u = sqrt(sigma) ~ U(eps / sqrt(2), eps): each quarter of the interval holds a quarter of the draws.
    u = sig.sqrt()
    lo = eps / math.sqrt(2)
    bins = torch.histc(u.float(), bins=4, min=lo, max=eps) / n
    assert (bins - 0.25).abs().max() <= 5 * math.sqrt(0.25 * 0.75 / n), bins
    # The mean is at init: LoRA's A, B = 0.
    for _, layer in bayes_layers(model):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


# --------------------------------------------------------------------------------------------- layer forward


def _base_out64(layer, x):
    base = layer.get_base_layer()
    w, b = base.weight.double(), (None if base.bias is None else base.bias.double())
    y = x.double() @ (w if type(base).__name__ == "Conv1D" else w.T)
    return y if b is None else y + b


def _delta64(layer, x, eps, signs=None, adapter="default"):
    """s * B W_t x_t per token in float64, with W_t = M + (sigma * E) * outer(r_out[t], r_in[t])."""
    spec = layer.bayeslora_spec[adapter]
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    sig = sigma_of(layer.bayeslora_rho[adapter], spec.std_param)
    mean = a if spec.factor == "A" else b
    xs = x.detach().double().reshape(-1, x.shape[-1])
    out = []
    for t in range(xs.shape[0]):
        pert = sig * eps.double()
        if signs is not None:
            pert = pert * torch.outer(signs[1].reshape(-1, mean.shape[0])[t], signs[0].reshape(-1, mean.shape[1])[t])
        wa, wb = (a + pert, b) if spec.factor == "A" else (a, b + pert)
        out.append(layer.scaling[adapter] * (wb @ (wa @ xs[t])))
    return torch.stack(out).reshape(*x.shape[:-1], -1)


def _quantized_base_out(layer, x):
    with torch.no_grad():
        return layer.get_base_layer()(x).double()  # the quantized layer's own output, in the layer's current mode


def _check_layer(layer, x, atol, base_out=_base_out64):
    """posterior_sample and train-mode flipout forwards of ``layer`` against the hand-made reference."""
    base_ref = base_out(layer, x)
    # Fixed draw: E shared by every token, no signs.
    with torch.no_grad(), posterior_sample(layer, seed=3):  # it walks modules: the layer itself is one
        eps = layer.bayeslora_fixed_eps["default"].clone()
        got = layer(x)
    want = base_ref + _delta64(layer, x, eps)
    noise_size = (want - base_ref - _delta64(layer, x, torch.zeros_like(eps))).abs().max()
    assert noise_size > 50 * atol  # the sampled part is visible at this tolerance
    err = (got.double() - want).abs().max().item()
    assert err <= atol, err
    assert layer.bayeslora_fixed_eps == {}

    # Train mode: the same global RNG state -> the same draw_noise call the layer makes.
    flipout = layer.bayeslora_spec["default"].flipout
    layer.train()
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            got = layer(x)
        base_train = base_out(layer, x)  # bitsandbytes' int8 layer computes differently in training mode
        torch.manual_seed(11)
        rho = layer.bayeslora_rho["default"]
        noise = draw_noise(x.shape[:-1], tuple(rho.shape), flipout, dtype=torch.float32)
    finally:
        layer.eval()
    want = base_train + _delta64(layer, x, noise.eps, (noise.sign_in, noise.sign_out) if flipout else None)
    err2 = (got.double() - want).abs().max().item()
    assert err2 <= atol, err2
    # Eval mode: the mean.
    with torch.no_grad():
        got = layer(x)
    err3 = (got.double() - base_ref - _delta64(layer, x, torch.zeros_like(eps))).abs().max().item()
    assert err3 <= atol, err3
    return max(err, err2, err3)


@pytest.mark.parametrize("arch,target", [("llama", "q_proj"), ("gpt2", "c_attn")])
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("std_param,flipout", [("square", True), ("softplus", True), ("square", False)])
def test_layer_forward_matches_reference(bases, arch, target, factor, std_param, flipout):
    model = make(bases, arch, target_modules=[target], bayesian_factor=factor, std_param=std_param, flipout=flipout)
    name, layer = bayes_layers(model)[0]
    assert isinstance(layer, bayes_layer.Linear) and name.endswith(target)
    base = layer.get_base_layer()
    assert type(base).__name__ == ("Conv1D" if arch == "gpt2" else "Linear")
    d_in = base.weight.shape[0 if arch == "gpt2" else 1]
    x = torch.randn(2, 3, d_in, generator=torch.Generator().manual_seed(5))
    _check_layer(layer, x, atol=2e-5)


QUANT = [
    ("int8", BitsAndBytesConfig(load_in_8bit=True)),
    ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)),
    ("fp4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)),
]


@pytest.mark.parametrize("kind,qconfig", QUANT, ids=[q[0] for q in QUANT])
def test_quantized_layer_forward_matches_reference(quant_dir, kind, qconfig):
    import bitsandbytes as bnb

    base = AutoModelForCausalLM.from_pretrained(quant_dir, quantization_config=qconfig).eval()
    torch.manual_seed(0)
    model = perturb(get_peft_model(base, config(target_modules=["q_proj", "v_proj"]))).eval()
    _, layer = bayes_layers(model)[0]
    want_cls, bnb_cls = (
        (bayes_layer.Linear8bitLt, bnb.nn.Linear8bitLt)
        if kind == "int8"
        else (bayes_layer.Linear4bit, bnb.nn.Linear4bit)
    )
    assert isinstance(layer, want_cls) and isinstance(layer.get_base_layer(), bnb_cls)
    if kind != "int8":
        assert layer.get_base_layer().weight.quant_state.quant_type == kind
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    _check_layer(layer, x, atol=2e-5, base_out=_quantized_base_out)
    # The whole model samples too: two posterior draws differ, the same seed repeats.
    with posterior_sample(model, 1):
        one = logits(model)
    with posterior_sample(model, 1):
        again = logits(model)
    with posterior_sample(model, 2):
        two = logits(model)
    assert torch.equal(one, again) and not torch.allclose(one, two, atol=1e-4)


# ------------------------------------------------------------------------------------------ mean mode / modes


def _plain_lora(bases, arch, model):
    torch.manual_seed(0)
    plain = get_peft_model(
        copy.deepcopy(bases[arch]), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")
    ).eval()
    state = {k: v for k, v in model.state_dict().items() if "bayeslora_rho" not in k}
    plain.load_state_dict(state, strict=True)  # the same parameter names, less rho
    return plain


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mean_mode_equals_plain_lora(bases, arch):
    model = make(bases, arch)
    plain = _plain_lora(bases, arch, model)
    want = logits(plain)
    assert not torch.allclose(want, logits(bases[arch]), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)
    model.train()
    with sampling(model, False):
        torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)
    model.eval()


def test_sampling_modes_and_restores(bases):
    model = make(bases)
    mean = logits(model)
    assert torch.equal(logits(model), mean)  # eval: deterministic mean
    model.train()
    first, second = logits(model), logits(model)
    assert not torch.allclose(first, second, atol=1e-4) and not torch.allclose(first, mean, atol=1e-4)
    # Gradients reach rho through the sampled forward, not through the mean.
    model(input_ids=IDS).logits.pow(2).mean().backward()
    rhos = [layer.bayeslora_rho["default"] for _, layer in bayes_layers(model)]
    assert all(r.grad is not None and r.grad.abs().max() > 0 for r in rhos)
    model.zero_grad(set_to_none=True)
    model.eval()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert all(r.grad is None for r in rhos)
    with sampling(model, True):
        assert not torch.allclose(logits(model), logits(model), atol=1e-4)
        with sampling(model, False):
            assert torch.equal(logits(model), mean)
        assert not torch.allclose(logits(model), mean, atol=1e-4)  # the outer mode is back
    assert all(layer.bayeslora_mode is None for _, layer in bayes_layers(model))
    assert torch.equal(logits(model), mean)
    with pytest.raises(RuntimeError), sampling(model, True):
        raise RuntimeError
    assert all(layer.bayeslora_mode is None for _, layer in bayes_layers(model))
    assert peft_bayes.is_bayesian(model)
    with model.disable_adapter():
        assert not peft_bayes.is_bayesian(model)
        torch.testing.assert_close(logits(model), logits(bases["llama"]), rtol=0, atol=0)


def test_posterior_sample(bases):
    model = make(bases)
    mean = logits(model)
    with posterior_sample(model, 7):
        a = logits(model)
        model.train()  # the fixed draw wins over training mode's fresh draws
        assert torch.equal(logits(model), a)
        model.eval()
        single = logits(model, IDS[:1])
        with posterior_sample(model, 8):
            b = logits(model)
        assert torch.equal(logits(model), a)  # the outer draw is back
    assert all(layer.bayeslora_fixed_eps == {} for _, layer in bayes_layers(model))
    assert torch.equal(logits(model), mean)
    with posterior_sample(model, 7):
        assert torch.equal(logits(model), a)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, mean, atol=1e-4)
    torch.testing.assert_close(single[0], a[0], rtol=0, atol=1e-5)  # independent of the batch
    with pytest.raises(RuntimeError), posterior_sample(model, 7):
        raise RuntimeError
    assert all(layer.bayeslora_fixed_eps == {} for _, layer in bayes_layers(model))


# -------------------------------------------------------------------------------------- to_lora, merge, save

_VANILLA = textwrap.dedent(
    """
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    for base_dir, adapter_dir, out in json.loads(sys.argv[2]):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
        with torch.no_grad():
            torch.save(merged(input_ids=ids).logits, out)
    assert not any(m.startswith("peft_bayes") for m in sys.modules), "peft_bayes was imported"
    """
)


def test_to_lora_loads_in_vanilla_peft(base_dirs, tmp_path):
    jobs, expected = [], {}
    for arch in ("llama", "gpt2"):
        base = AutoModelForCausalLM.from_pretrained(base_dirs[arch]).eval()
        torch.manual_seed(0)
        model = perturb(get_peft_model(base, config(prior_std=0.3, std_param="softplus"))).eval()
        expected[arch] = logits(model)
        out_dir = tmp_path / f"lora-{arch}"
        assert model.to_lora(str(out_dir)) == str(out_dir)
        assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
        cfg = json.loads((out_dir / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert not set(BAYES_FIELDS) & set(cfg)
        weights = load_file(str(out_dir / "adapter_model.safetensors"))
        assert len(weights) == 2 * len(bayes_layers(model))
        assert all(("lora_A" in k or "lora_B" in k) and ".default." not in k for k in weights)
        assert not any("bayeslora" in k for k in weights)
        jobs.append([base_dirs[arch], str(out_dir), str(tmp_path / f"{arch}.pt")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _VANILLA, json.dumps(IDS.tolist()), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arch, (_, _, out) in zip(("llama", "gpt2"), jobs):
        torch.testing.assert_close(torch.load(out), expected[arch], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_is_the_mean(bases, arch):
    model = make(bases, arch)
    mean = logits(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model), mean, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p.detach(), base_weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), mean, rtol=0, atol=1e-5)
    with posterior_sample(model, 0):  # still samples after the round trip
        assert not torch.allclose(logits(model), mean, atol=1e-4)
    merged = model.merge_and_unload()
    assert not bayes_layers(merged)
    torch.testing.assert_close(logits(merged), mean, rtol=0, atol=1e-5)


def test_save_load_round_trip(bases, tmp_path):
    fields = {"prior_std": 0.3, "init_std": 0.1, "std_param": "softplus", "flipout": False, "kl_schedule": "linear",
              "kl_weight": 0.5, "kl_anneal_steps": 7, "bayesian_factor": "B"}  # fmt: skip
    model = make(bases, "llama", **fields)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BAYESLORA"
    loaded = PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path).eval()
    cfg = loaded.peft_config["default"]
    assert isinstance(cfg, BayesLoraConfig)
    for key, value in fields.items():
        assert getattr(cfg, key) == value, key
    ours = dict(bayes_layers(model))
    theirs = dict(bayes_layers(loaded))
    assert ours.keys() == theirs.keys()
    for name, layer in theirs.items():
        assert layer.bayeslora_spec == ours[name].bayeslora_spec
        assert torch.equal(layer.bayeslora_rho["default"], ours[name].bayeslora_rho["default"])
        assert layer.bayeslora_rho["default"].shape == layer.lora_B["default"].weight.shape
    assert torch.equal(logits(loaded), logits(model))
    for seed in (0, 1):
        with posterior_sample(model, seed), posterior_sample(loaded, seed):
            assert torch.equal(logits(loaded), logits(model))
    torch.testing.assert_close(loaded.kl_divergence(), model.kl_divergence(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- config, adapters


@pytest.mark.parametrize(
    "bad",
    [
        {"use_dora": True},
        {"std_param": "exp"},
        {"prior_std": 0.0},
        {"prior_std": -1.0},
        {"init_std": 0.0},
        {"kl_schedule": "cosine"},
        {"bayesian_factor": "C"},
        {"kl_weight": -1.0},
        {"kl_anneal_steps": 0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        config(**bad)


def test_config_defaults():
    cfg = config()
    assert cfg.peft_type == "BAYESLORA"
    assert (cfg.prior_std, cfg.init_std, cfg.std_param, cfg.flipout, cfg.bayesian_factor) == (
        0.2,
        0.05,
        "square",
        True,
        "A",
    )


def _kl_ref(model, adapter, prior_std, factor, std_param):
    total = 0.0
    for _, layer in bayes_layers(model):
        mean = (layer.lora_A if factor == "A" else layer.lora_B)[adapter].weight.detach().double()
        sig = sigma_of(layer.bayeslora_rho[adapter], std_param)
        total += kl_divergence(Normal(mean, sig), Normal(torch.zeros_like(mean), prior_std)).sum().item()
    return total


def test_two_adapters(bases):
    model = make(bases)
    model.add_adapter("other", config(bayesian_factor="B", prior_std=0.5, std_param="softplus"))
    perturb(model, "other", seed=9)
    for _, layer in bayes_layers(model):
        assert set(layer.bayeslora_rho) == {"default", "other"}
        assert layer.bayeslora_rho["other"].shape == layer.lora_B["other"].weight.shape
    kl_default = _kl_ref(model, "default", 0.2, "A", "square")
    kl_other = _kl_ref(model, "other", 0.5, "B", "softplus")
    assert model.kl_divergence().item() == pytest.approx(kl_default, rel=1e-5)
    assert model.kl_divergence(adapter_name="other").item() == pytest.approx(kl_other, rel=1e-5)
    out_default = logits(model)

    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    assert any("bayeslora_rho.other" in n for n in trainable)
    assert model.kl_divergence().item() == pytest.approx(kl_other, rel=1e-5)
    out_other = logits(model)
    assert not torch.allclose(out_other, out_default, atol=1e-4)
    with posterior_sample(model, 0):
        assert all(set(layer.bayeslora_fixed_eps) == {"other"} for _, layer in bayes_layers(model))
        assert not torch.allclose(logits(model), out_other, atol=1e-4)

    model.set_adapter("default")
    assert torch.equal(logits(model), out_default)
    model.delete_adapter("other")
    for _, layer in bayes_layers(model):
        assert set(layer.bayeslora_rho) == {"default"}
        assert "other" not in layer.lora_A
    assert not any("other" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError):
        model.kl_divergence(adapter_name="other")
    assert torch.equal(logits(model), out_default)


def test_softplus_inverse():
    std = torch.tensor([1e-6, 1e-3, 0.0025, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(bayes_layer.rho_from_std(std, "softplus")), std, rtol=1e-10, atol=0)
    torch.testing.assert_close(bayes_layer.rho_from_std(std, "square") ** 2, std, rtol=1e-12, atol=0)
