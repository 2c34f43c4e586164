"""The fused Triton path of the sampled LoRA update against the pure-PyTorch reference, with identical noise.

On CPU these run in triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported);
on a GPU machine the same tests run the compiled kernels. ``philox_noise`` materialises exactly the E and signs the
kernels generate in registers for a seed, so the reference (itself checked against a dense per-token float64
computation in test_sampled_lora_reference.py) sees the same draw.

- forward and every gradient (x, M, rho through both parametrisations, B, the base output) over a grid of shapes
  (odd sizes), dtypes, ranks 1-128, flipout on/off, noise on/off; a wrong seed or sign must fail the same check;
- the noise statistics over many seeds: E ~ N(0, 1), balanced signs, per-entry variance of the noise path = sigma^2;
- BayesLoRA layers on nn.Linear, Conv1D, int8, NF4 / FP4 (with and without double quantisation) on the fused path,
  forward and adapter gradients,
  equal the float64 reference; on 4-bit bases the update lands in bitsandbytes' own output buffer (no copy);
- dispatch: ``PEFT_BAYES_KERNEL`` values, fallbacks, the CPU-without-interpreter error;
- training: a tiny model trained with each path reaches the same loss; gradient checkpointing replays the seed.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_bayes import BayesLoraConfig, sampling
from peft_bayes.kernels import sampled_lora as sl
from peft_bayes.models import disable_bnb_cpu_repacking, enable_activation_checkpointing
from peft_bayes.tiny import build_tiny_model, save_tiny_model
from peft_bayes.tuners.bayeslora.layer import std_from_rho
from peft_bayes.tuners.bayeslora.sampling import bayes_layers

pytestmark = pytest.mark.triton  # skipped without a Triton runtime; compiled on CUDA (tests/kernels/conftest.py)
DEVICE = sl.kernel_device().type
# Tolerance relative to the largest reference entry: fp32 accumulates in a different order; fp16 / bf16 round the
# inputs of each product (bf16 has 8 mantissa bits).
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.float64: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Every test here forces the fused path (tests that compare paths set the variable themselves)."""
    monkeypatch.setenv(sl.KERNEL_ENV, "triton")


def _noise64(seed, tokens, shape, flipout):
    noise = sl.philox_noise(seed, tokens, shape, flipout, device=DEVICE)
    cast = {k: None if v is None else v.double() for k, v in vars(noise).items()}
    return sl.LoraNoise(**cast)


def _inputs(t, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    m = torch.randn(r, k, generator=g) / k**0.5
    rho = 0.3 + 0.4 * torch.rand(r, k, generator=g)  # sigma = rho^2 in [0.09, 0.49]: the noise path is large
    b = torch.randn(n, r, generator=g) / r**0.5
    base = torch.randn(t, n, generator=g)
    grad = torch.randn(t, n, generator=g)
    return [v.to(DEVICE, dtype) for v in (x, m, rho, b, base, grad)]


def _run(path, x, m, rho, b, base, grad, std_param, noise, flipout, seed, scaling=1.7):
    """Forward + backward of base + update on one path; returns the output and the grads of (x, m, rho, b, base)."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, m, rho, b, base)]
    lx, lm, lrho, lb, lbase = leaves
    std = std_from_rho(lrho, std_param) if noise else None
    if path == "triton":
        out = sl.add_sampled_lora(lbase * 1, lx, lm, lb, scaling, std=std, flipout=flipout, seed=seed)
    else:  # float64 reference with the kernel's draws
        draws = _noise64(seed, x.shape[0], tuple(m.shape), flipout) if noise else None
        out = lbase + sl.sampled_lora_delta(lx, lm, lb, scaling, a_std=std, noise=draws)
    (out * grad).sum().backward()
    return [out.detach()] + [v.grad for v in leaves]


def _check_close(got, want, dtype, what):
    for name, g, w in zip(("out", "dx", "dM", "drho", "dB", "dbase"), got, want):
        if g is None and w is None:
            continue
        assert g is not None and w is not None, (what, name)
        scale = w.double().abs().max().item() + 1e-12
        err = (g.double() - w.double()).abs().max().item()
        assert err <= RTOL[dtype] * scale, f"{what} {name}: max error {err:.3g} vs scale {scale:.3g}"


SHAPES = [  # (tokens, d_in, d_out, rank): odd sizes, a single token, ranks 1 to 128
    (1, 8, 5, 1),
    (7, 33, 17, 3),
    (37, 65, 40, 16),
    (20, 24, 30, 70),
    (9, 16, 12, 128),
    (70, 130, 9, 8),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "noise,flipout,std_param",
    [
        (True, True, "square"),
        (True, True, "softplus"),
        (True, False, "square"),
        (True, False, "softplus"),
        (False, False, "square"),
    ],
)
def test_fused_matches_reference_float32(shape, noise, flipout, std_param):
    args = _inputs(*shape, torch.float32, seed=sum(shape))
    got = _run("triton", *args, std_param, noise, flipout, seed=77)
    want = _run("reference", *[v.double() for v in args], std_param, noise, flipout, seed=77)
    _check_close(got, want, torch.float32, f"{shape} noise={noise} flipout={flipout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33, 17, 3), (37, 65, 40, 16)], ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference_half(shape, dtype):
    args = _inputs(*shape, dtype, seed=5)
    got = _run("triton", *args, "square", True, True, seed=123)
    assert all(g.dtype == dtype for g in got)
    want = _run("reference", *[v.double() for v in args], "square", True, True, seed=123)
    _check_close(got, want, dtype, f"{shape} {dtype}")


@pytest.mark.parametrize("flipout", [True, False])
def test_split_k_forward_equals_one_pass(flipout):
    """The GPU splits K over programs (partial sums per split); every split count gives the same h."""
    x, m, rho, *_ = _inputs(40, 200, 8, 5, torch.float32, seed=9)
    w, _ = sl._scaled_noise(rho**2, 21, x.dtype)
    one = sl._down_forward(x, m, w, 21, True, flipout, n_split=1)
    for n_split in (2, 3, 5):  # 200 = 4 blocks of 64: uneven shares, and with 5 a split with no block
        torch.testing.assert_close(sl._down_forward(x, m, w, 21, True, flipout, n_split=n_split), one)
    draws = _noise64(21, 40, (5, 200), flipout)
    want = sl.flipout_linear(x.double(), m.double(), rho.double() ** 2, draws)
    assert (one.double() - want).abs().max() <= RTOL[torch.float32] * want.abs().max()


@pytest.mark.parametrize("tiles", ["16x16w2", "32x128", "64x32w8"])
def test_tile_sizes_give_the_same_layer(tiles):
    """Any tiles a tuning run picks compute the same layer and draws: BLOCK_K 16 (signs entry by entry), 32 (one
    word per tile row) and 128 (four), warps included, against the float64 reference with the kernels' draws."""
    shape = (37, 130, 40, 8)
    args = _inputs(*shape, torch.float32, seed=3)
    with sl.tile_sizes(sl.Tiles.parse(tiles)):
        assert sl._blocks(37, 130, 8)[:2] == (int(tiles.split("x")[0]), int(tiles.split("x")[1].split("w")[0]))
        got = _run("triton", *args, "square", True, True, seed=5)
    want = _run("reference", *[v.double() for v in args], "square", True, True, seed=5)
    _check_close(got, want, torch.float32, f"tiles {tiles}")
    assert sl._TILES.get() is None  # restored on exit


def test_tiles_reject_what_triton_cannot_run():
    for bad, why in [("64x100", "power of two"), ("8x64", "power of two"), ("64x64w3", "num_warps"), ("64", "e.g.")]:
        with pytest.raises(ValueError, match=why):
            sl.Tiles.parse(bad)


def test_check_detects_a_different_draw():
    """The comparison can fail: another seed, or the reference without flipout signs, is far outside it."""
    args = _inputs(37, 65, 40, 16, torch.float32, seed=1)
    got = _run("triton", *args, "square", True, True, seed=77)
    for seed, flipout in ((78, True), (77, False)):
        want = _run("reference", *[v.double() for v in args], "square", True, flipout, seed=seed)
        with pytest.raises(AssertionError):
            _check_close(got[:1], want[:1], torch.float32, "wrong draw")


def test_noise_statistics_over_seeds():
    """E ~ N(0, 1) entrywise, signs are balanced +-1, and the noise path has mean 0 and per-entry variance sigma^2."""
    rows, cols, tokens, n_seeds = 3, 5, 4, 400
    eps = torch.stack([sl.philox_noise(s, tokens, (rows, cols), device=DEVICE).eps for s in range(n_seeds)]).cpu()
    # Moments of all 6000 draws; 6 standard errors of the mean / variance estimates.
    flat = eps.flatten().double()
    assert abs(flat.mean()) < 6 / flat.numel() ** 0.5
    assert abs(flat.var() - 1) < 6 * (2 / flat.numel()) ** 0.5
    signs = sl.philox_noise(0, 1000, (rows, cols), device=DEVICE)
    for s in (signs.sign_in, signs.sign_out):
        assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(s.mean()) < 6 / s.numel() ** 0.5

    # One-hot token inputs pick single entries: h[t, r] = r_in r_out sigma[r, k] E[r, k] for x_t = e_k.
    sigma = torch.linspace(0.1, 0.9, rows * cols).reshape(rows, cols)
    x = torch.eye(cols)  # token k is e_k
    zero_m, eye_b = torch.zeros(rows, cols), torch.eye(rows)
    samples = []
    for seed in range(n_seeds):
        out = torch.zeros(cols, rows)
        args = [v.to(DEVICE) for v in (out, x, zero_m, eye_b)]
        samples.append(sl.add_sampled_lora(*args[:2], args[2], args[3], 1.0, std=sigma.to(DEVICE), seed=seed).cpu())
    h = torch.stack(samples).double()  # (seeds, token k, rank r)
    want_var = (sigma.T.double()) ** 2  # (k, r)
    assert (h.mean(0).abs() < 6 * (want_var / n_seeds).sqrt()).all()
    # Var of a sample variance of normals: 2 sigma^4 / (n - 1).
    assert ((h.var(0) - want_var).abs() < 6 * want_var * (2 / (n_seeds - 1)) ** 0.5).all()


def test_packed_signs_are_balanced_and_uncorrelated():
    """r_in and r_out take 32 signs from the bits of one Philox draw: they must still look like independent fair
    coins, within a word (neighbouring columns), across words (columns 32 apart: the same bit of the next draw),
    across tokens and across seeds."""
    tokens, cols = 300, 96  # three words per token
    s = sl.philox_noise(3, tokens, (2, cols), device=DEVICE).sign_in.cpu().double()
    other = sl.philox_noise(4, tokens, (2, cols), device=DEVICE).sign_in.cpu().double()
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    pairs = {
        "mean": s,
        "neighbouring columns": s[:, :-1] * s[:, 1:],
        "columns 32 apart": s[:, :-32] * s[:, 32:],
        "neighbouring tokens": s[:-1] * s[1:],
        "seeds 3 and 4": s * other,
    }
    for what, prod in pairs.items():  # each a mean of +-1 terms: 6 standard errors
        assert abs(prod.mean().item()) < 6 / prod.numel() ** 0.5, what
    bits = (s > 0).reshape(tokens, 3, 32).double().mean((0, 1))  # every bit position is a fair coin
    assert ((bits - 0.5).abs() < 6 * (0.25 / (tokens * 3)) ** 0.5).all(), bits
    # r_out (tokens x rank) has the same layout: 70 ranks span three words per token.
    out = sl.philox_noise(3, tokens, (70, 8), device=DEVICE).sign_out.cpu().double()
    for what, prod in {
        "r_out": out,
        "neighbouring ranks": out[:, :-1] * out[:, 1:],
        "tokens": out[:-1] * out[1:],
    }.items():
        assert abs(prod.mean().item()) < 6 / prod.numel() ** 0.5, what


# ------------------------------------------------------------------------------------------------ dispatch


def test_kernel_path_dispatch(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(sl.KERNEL_ENV, raising=False)
    assert sl.kernel_path(x) == ("triton" if x.is_cuda else "reference")  # auto: triton on CUDA tensors only
    monkeypatch.setenv(sl.KERNEL_ENV, "reference")
    assert sl.kernel_path(x) == "reference"
    monkeypatch.setenv(sl.KERNEL_ENV, " Triton ")
    assert sl.kernel_path(x) == "triton"  # the interpreter on CPU
    monkeypatch.setenv(sl.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match=r"PEFT_BAYES_KERNEL='cuda': expected one of auto, triton, reference"):
        sl.kernel_path(x)


def test_triton_on_cpu_without_interpreter_is_one_line_error():
    code = (
        "import torch\nfrom peft_bayes.kernels.sampled_lora import add_sampled_lora\n"
        "add_sampled_lora(torch.zeros(2, 4), torch.ones(2, 3), torch.ones(1, 3), torch.ones(4, 1), 1.0)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", sl.KERNEL_ENV: "triton", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "PEFT_BAYES_KERNEL=triton on CPU tensors needs TRITON_INTERPRET=1" in proc.stderr.splitlines()[-1]


def test_fused_path_updates_in_place_and_falls_back():
    x, a, b = torch.randn(3, 6), torch.randn(2, 6), torch.randn(4, 2)
    std = torch.full((2, 6), 0.1)
    result = torch.zeros(3, 4)
    out = sl.add_sampled_lora(result, x, a, b, 2.0, std=std)
    assert out.data_ptr() == result.data_ptr()  # into the base output buffer
    # The fused path covers factor A without a LoRA bias; the rest is the reference (a new tensor).
    for kw in ({"factor": "B", "std": torch.full((4, 2), 0.1)}, {"b_bias": torch.ones(4)}):
        base = torch.zeros(3, 4)
        assert sl.add_sampled_lora(base, x, a, b, 2.0, **kw).data_ptr() != base.data_ptr()
    # A fixed draw (posterior_sample) is the plain fused LoRA with M + sigma * E.
    eps = torch.randn(2, 6)
    fixed = sl.add_sampled_lora(torch.zeros(3, 4), x, a, b, 2.0, std=std, eps=eps)
    torch.testing.assert_close(fixed, 2.0 * x @ (a + std * eps).T @ b.T, rtol=1e-5, atol=1e-5)


class _ViewedBase(torch.autograd.Function):
    """A base product whose output is a view made inside an autograd Function, as bitsandbytes' int8 matmul returns
    on CUDA: autograd forbids updating it in place (seen on an H200: the int8 layer test failed until it was
    copied)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        out = x @ w.t()
        return out.view(out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, grad.t() @ x


def test_fused_path_on_a_base_output_viewed_inside_an_autograd_function():
    x, m, rho, b, _, grad = _inputs(9, 33, 17, 3, torch.float32, seed=4)
    w = torch.randn(17, 33, device=DEVICE)
    results = []
    for viewed in (True, False):
        leaves = [v.detach().clone().requires_grad_() for v in (x, w, m, rho, b)]
        lx, lw, lm, lrho, lb = leaves
        base = _ViewedBase.apply(lx, lw) if viewed else lx @ lw.t()
        assert base._is_view() == viewed
        out = sl.add_sampled_lora(base, lx, lm, lb, 1.3, std=lrho**2, seed=11)
        (out * grad).sum().backward()
        results.append([out.detach()] + [v.grad for v in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ layers


def _perturbed(model, seed=1):
    """Random B and a wide posterior, so the update and its noise are far above the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bayes_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            rho = layer.bayeslora_rho["default"]
            rho.copy_(0.3 + 0.3 * torch.rand(rho.shape, generator=g))
    return model


def _adapter_params(layer):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return {"lora_A": a, "lora_B": b, "bayeslora_rho": layer.bayeslora_rho["default"]}


def _layer_case(layer, x):
    """One training-mode forward + backward of ``layer`` on the fused path against the float64 reference with the
    kernels' draws: (max relative output error, max relative adapter-gradient error, base output pointer, layer
    output pointer)."""
    seen = {}

    def hook(_module, _inputs, output):
        seen["base"], seen["ptr"] = output.detach().double().clone(), output.data_ptr()

    handle = layer.get_base_layer().register_forward_hook(hook)
    layer.train()
    try:
        torch.manual_seed(11)
        got = layer(x)
        dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        (got * dy).sum().backward()  # through bitsandbytes' autograd too: the in-place update must not break it
    finally:
        handle.remove()
        layer.eval()
    torch.manual_seed(11)
    seed = sl.draw_seed()  # the layer drew its seed with the same call after the same reseed
    params = _adapter_params(layer)
    leaves = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    spec = layer.bayeslora_spec["default"]
    std = std_from_rho(leaves["bayeslora_rho"], spec.std_param)
    noise = _noise64(seed, x.shape[:-1].numel(), tuple(std.shape), spec.flipout)
    if noise.sign_in is not None:
        noise.sign_in = noise.sign_in.reshape(*x.shape[:-1], -1)
        noise.sign_out = noise.sign_out.reshape(*x.shape[:-1], -1)
    delta = sl.sampled_lora_delta(
        x.double(), leaves["lora_A"], leaves["lora_B"], layer.scaling["default"], a_std=std, noise=noise
    )
    (delta * dy.double()).sum().backward()
    want = seen["base"] + delta.detach()
    out_err = ((got.double() - want).abs().max() / want.abs().max()).item()
    grad_err = max(
        ((params[k].grad.double() - leaves[k].grad).abs().max() / leaves[k].grad.abs().max()).item() for k in params
    )
    return out_err, grad_err, seen["ptr"], got.data_ptr()


@pytest.mark.parametrize("arch,target", [("llama", "q_proj"), ("gpt2", "c_attn")])
@pytest.mark.parametrize("std_param,flipout", [("square", True), ("softplus", True), ("square", False)])
def test_layer_on_fused_path_matches_reference(tiny_tokenizer, arch, target, std_param, flipout):
    base = build_tiny_model(arch, tiny_tokenizer, hidden_size=32, num_heads=4)
    torch.manual_seed(0)
    cfg = BayesLoraConfig(r=4, lora_alpha=8, target_modules=[target], std_param=std_param, flipout=flipout)
    model = _perturbed(get_peft_model(base, cfg)).to(DEVICE)
    _, layer = bayes_layers(model)[0]
    x = torch.randn(2, 5, 32, device=DEVICE)
    out_err, grad_err, *_ = _layer_case(layer, x)
    assert out_err <= 1e-5 and grad_err <= 1e-5, (out_err, grad_err)


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory, tiny_tokenizer):
    # bitsandbytes' CPU 4-bit path packs blocks of 64 inputs: the width must be a multiple of 64.
    root = tmp_path_factory.mktemp("fused-quant")
    return save_tiny_model(root, "llama", tokenizer=tiny_tokenizer, hidden_size=64)


QUANT = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("kind", list(QUANT))
def test_quantized_layer_on_fused_path(quant_dir, kind):
    base = AutoModelForCausalLM.from_pretrained(quant_dir, quantization_config=QUANT[kind])
    disable_bnb_cpu_repacking(base)
    torch.manual_seed(0)
    model = _perturbed(get_peft_model(base, BayesLoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])))
    _, layer = bayes_layers(model)[0]
    assert type(layer.get_base_layer()).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    x = torch.randn(2, 5, 64, device=DEVICE)
    out_err, grad_err, base_ptr, out_ptr = _layer_case(layer, x)
    assert out_err <= 1e-5 and grad_err <= 1e-5, (out_err, grad_err)
    if kind != "int8":  # PEFT's 4-bit forward copies the base output; ours adds into bitsandbytes' buffer
        assert out_ptr == base_ptr


# ------------------------------------------------------------------------------------------------ training


def _train_losses(tiny_tokenizer, path, monkeypatch, mean_mode, checkpointing=False, steps=6):
    monkeypatch.setenv(sl.KERNEL_ENV, path)
    base = build_tiny_model("llama", tiny_tokenizer, hidden_size=32, num_heads=4)
    torch.manual_seed(0)
    cfg = BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_std=0.2)
    model = get_peft_model(base, cfg).to(DEVICE)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    losses, grads = [], None
    torch.manual_seed(5)
    with sampling(model, not mean_mode):
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss + model.kl_divergence() / 1000
            loss.backward()
            if grads is None:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses, grads


def test_training_reaches_the_same_loss_on_both_paths(tiny_tokenizer, monkeypatch):
    # Posterior mean: the same computation, so the same trajectory up to fp32 summation order.
    ref, _ = _train_losses(tiny_tokenizer, "reference", monkeypatch, mean_mode=True)
    fused, _ = _train_losses(tiny_tokenizer, "triton", monkeypatch, mean_mode=True)
    assert ref[-1] < ref[0] - 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(ref, fused)) < 1e-4
    # Sampling: different draws (torch's generator vs Philox), the same distribution: the same loss within noise.
    ref, _ = _train_losses(tiny_tokenizer, "reference", monkeypatch, mean_mode=False)
    fused, _ = _train_losses(tiny_tokenizer, "triton", monkeypatch, mean_mode=False)
    assert ref[-1] < ref[0] - 0.05 and fused[-1] < fused[0] - 0.05
    assert abs(ref[-1] - fused[-1]) < 0.05 * ref[-1]


def test_gradient_checkpointing_replays_the_fused_draw(tiny_tokenizer, monkeypatch):
    """Recomputation in backward draws the same seed (the checkpoint restores the CPU RNG): identical gradients."""
    _, plain = _train_losses(tiny_tokenizer, "triton", monkeypatch, mean_mode=False, steps=1)
    _, ckpt = _train_losses(tiny_tokenizer, "triton", monkeypatch, mean_mode=False, checkpointing=True, steps=1)
    assert plain.keys() == ckpt.keys() and any("bayeslora_rho" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_copy_keeps_kernels_working(tiny_tokenizer):
    """deepcopy (used by ensembles and the bench) keeps the layers on the fused path."""
    base = build_tiny_model("llama", tiny_tokenizer, hidden_size=32, num_heads=4)
    model = get_peft_model(base, BayesLoraConfig(r=2, target_modules=["q_proj"])).to(DEVICE)
    twin = copy.deepcopy(model)
    ids = torch.arange(3, 11, device=DEVICE)[None]
    with torch.no_grad(), sampling(model, False), sampling(twin, False):
        torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_autocast_runs_the_kernels_in_the_autocast_dtype():
    """Under torch.autocast (mixed-precision training) the fp32 adapter runs in bf16, like F.linear would."""
    x, m, rho, b, _, grad = _inputs(9, 40, 12, 4, torch.float32, seed=2)
    leaves = [v.clone().requires_grad_() for v in (x, m, rho, b)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        base = torch.nn.functional.linear(leaves[0], torch.ones(12, 40, device=DEVICE) / 40)
        base0 = base.detach().double()  # the fused path adds into base in place
        out = sl.add_sampled_lora(base, leaves[0], leaves[1], leaves[3], 1.0, std=leaves[2] ** 2, seed=4)
    assert out.dtype == torch.bfloat16
    (out.float() * grad).sum().backward()
    assert all(v.grad is not None and v.grad.dtype == torch.float32 for v in leaves)
    draws = _noise64(4, 9, (4, 40), True)
    want = base0 + sl.sampled_lora_delta(x.double(), m.double(), b.double(), 1.0, a_std=rho.double() ** 2, noise=draws)
    assert (out.double() - want).abs().max() <= RTOL[torch.bfloat16] * want.abs().max()
