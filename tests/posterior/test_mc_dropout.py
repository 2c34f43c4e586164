"""MC dropout (``posterior.mc_dropout``): rate 0 is the plain adapter exactly, masks are reproducible by seed and
differ across seeds, one mask holds for a whole pass (batched == one example at a time, every scoring path), masks
keep 1 - p of the features, for LoRA and a bottleneck adapter; one-line errors for an adapter without dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_bayes.errors import InputError
from peft_bayes.evaluation.packed_scoring import packing_is_exact
from peft_bayes.evaluation.predictive import PairScorer
from peft_bayes.posterior import POSTERIORS, MCDropout, PointEstimate, load_posterior
from peft_bayes.posterior.mc_dropout import dropout_modules, element_mask, feature_mask, module_seed
from peft_bayes.tiny import build_tiny_model
from peft_bayes.tuners import BottleneckConfig

F64 = {"rtol": 1e-10, "atol": 1e-12}
PAIRS = [
    [("3+4=", " 7"), ("3+4=", " 8"), ("3+4=", " 12")],
    [("5+1=", " 6"), ("5+1=", " 9")],
    [("The answer is", " true"), ("The answer is", " false")],
    [("9-2=", " 7"), ("9-2=", " 11"), ("9-2=", " 5")],
    [("2+2=", " 4"), ("2+2=", " 5"), ("2+2=", " 22")],
]


@pytest.fixture(scope="module")
def base(tiny_tokenizer):
    return build_tiny_model("gpt2", tiny_tokenizer, hidden_size=16, num_layers=2, num_heads=2).double().eval()


def lora(base, dropout: float):
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["c_attn", "mlp.c_fc"], fan_in_fan_out=True, lora_dropout=dropout, init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(base), config).double().eval()


def bottleneck(base, dropout: float):
    torch.manual_seed(0)
    config = BottleneckConfig(
        target_modules=["mlp.c_proj"], bottleneck_size=4, adapter_dropout=dropout, init_weights=False, scaling=4.0
    )
    return get_peft_model(copy.deepcopy(base), config).double().eval()


@pytest.fixture(scope="module", params=["lora", "bottleneck"])
def adapted(request, base):
    """(model, its adapter's dropout rate, the number of adapted layers)."""
    build, rate, n_layers = {"lora": (lora, 0.3, 4), "bottleneck": (bottleneck, 0.2, 2)}[request.param]
    return build(base, rate), rate, n_layers


def probs(posterior, model, tokenizer, samples: int, seed: int, batch_size: int = 2, scoring: str = "shared"):
    return posterior.option_probs(PairScorer(model, tokenizer, PAIRS, batch_size, scoring), samples, seed)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_registered():
    assert POSTERIORS["mc_dropout"] is MCDropout and MCDropout.stochastic


def test_rate_from_the_adapter(adapted):
    model, rate, n_layers = adapted
    posterior = MCDropout(model)
    assert set(posterior.rates.values()) == {rate} and len(posterior.rates) == n_layers


def test_rate_zero_is_the_plain_adapter_exactly(adapted, tiny_tokenizer):
    model, *_ = adapted
    plain = probs(PointEstimate(model), model, tiny_tokenizer, 0, 0)
    assert same(probs(MCDropout(model, rate=0.0), model, tiny_tokenizer, 1, 0), plain)
    for a, b in zip(probs(MCDropout(model, rate=0.0), model, tiny_tokenizer, 3, 0), plain):  # (p + p + p) / 3
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-16)
    assert same(probs(MCDropout(model), model, tiny_tokenizer, 0, 0), plain)  # the mean pass: no dropout


def test_masks_reproducible_by_seed_and_different_across_seeds(adapted, tiny_tokenizer):
    model, *_ = adapted
    posterior = MCDropout(model)
    one, again = (probs(posterior, model, tiny_tokenizer, 1, 7) for _ in range(2))
    assert same(one, again)
    other = probs(posterior, model, tiny_tokenizer, 1, 8)
    assert not any(torch.allclose(a, b, **F64) for a, b in zip(one, other))
    plain = probs(PointEstimate(model), model, tiny_tokenizer, 0, 0)
    assert not any(torch.allclose(a, b, **F64) for a, b in zip(one, plain))  # the masks do act

    masks = []
    for seed in (3, 3, 4):
        context = posterior.sample(seed)
        with context:
            PairScorer(model, tiny_tokenizer, PAIRS, 2).scores()
        masks.append(context.masks)
    assert set(masks[0]) == set(posterior.rates)
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert any(not torch.equal(masks[0][k], masks[2][k]) for k in masks[0])


@pytest.mark.parametrize("scoring", ["shared", "cached", "full"])
def test_one_mask_per_pass_batched_equals_one_at_a_time(adapted, tiny_tokenizer, scoring):
    model, *_ = adapted
    posterior = MCDropout(model)
    with posterior.sample(11):
        batched = PairScorer(model, tiny_tokenizer, PAIRS, 4, scoring).scores()
        alone = [PairScorer(model, tiny_tokenizer, [p], 1, "full").scores()[0] for p in PAIRS]
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, **F64)


def test_masks_keep_one_minus_p(adapted, tiny_tokenizer):
    model, rate, _ = adapted
    posterior = MCDropout(model)
    kept = total = 0
    for seed in range(20):
        context = posterior.sample(seed)
        with context:
            PairScorer(model, tiny_tokenizer, PAIRS[:1], 1).scores()
        for name, mask in context.masks.items():
            module = dict((n, m) for n, m in dropout_modules(model))[name]
            assert mask.shape == (module_width(model, name),), name
            values = set(mask.unique().tolist())
            assert values <= {0.0, 1 / (1 - rate)}, values
            kept, total = kept + int((mask > 0).sum()), total + mask.numel()
            assert isinstance(module, nn.Dropout)
    sd = (rate * (1 - rate) / total) ** 0.5
    assert abs(kept / total - (1 - rate)) < 4 * sd

    mask = feature_mask(200_000, 0.3, seed=0)
    assert abs(float((mask > 0).double().mean()) - 0.7) < 4 * (0.21 / 200_000) ** 0.5


def module_width(model, name: str) -> int:
    """The input width of dropout module ``name`` (``<layer>.<container>.<adapter>``): LoRA A's / the down
    projection's."""
    layer_name, container, adapter = name.rsplit(".", 2)
    layer = model.get_submodule(layer_name)
    first = layer.lora_A if container == "lora_dropout" else layer.adapter_down
    return first[adapter].in_features


def test_hooks_are_removed_and_train_mode_is_overridden(adapted, tiny_tokenizer):
    model, *_ = adapted
    posterior = MCDropout(model)
    plain = probs(PointEstimate(model), model, tiny_tokenizer, 0, 0)
    sampled = probs(posterior, model, tiny_tokenizer, 1, 5)
    assert same(probs(PointEstimate(model), model, tiny_tokenizer, 0, 0), plain)
    assert all(not m._forward_hooks for _, m in dropout_modules(model))
    model.train()  # training-time dropout would draw fresh masks per call: the pass's own mask replaces it
    try:
        assert same(probs(posterior, model, tiny_tokenizer, 1, 5), sampled)
    finally:
        model.eval()


def test_save_load(adapted, tiny_tokenizer, tmp_path):
    model, *_ = adapted
    posterior = MCDropout(model, rate=0.5)
    loaded = load_posterior(model, posterior.save(str(tmp_path / "mc")))
    assert isinstance(loaded, MCDropout) and loaded.rates == posterior.rates
    assert same(probs(loaded, model, tiny_tokenizer, 2, 1), probs(posterior, model, tiny_tokenizer, 2, 1))


def test_errors(base):
    no_dropout = lora(base, 0.0)
    with pytest.raises(InputError, match=r"mc_dropout needs an adapter trained with dropout \(lora_dropout"):
        MCDropout(no_dropout)
    assert set(MCDropout(no_dropout, rate=0.1).rates.values()) == {0.1}  # an explicit rate
    with pytest.raises(InputError, match="rate must be in"):
        MCDropout(no_dropout, rate=1.0)
    with pytest.raises(InputError, match="needs an adapter with dropout modules"):
        MCDropout(copy.deepcopy(base))
    with pytest.raises(InputError, match="adapter_dropout"):
        MCDropout(bottleneck(base, 0.0))


# --- element masks (the authors' code: dropout modules in train mode) -----------------------------------------------
def test_element_masks_are_fresh_per_element_and_per_forward(base, tiny_tokenizer):
    """One LoRA layer by hand: every forward of a pass multiplies the dropout's input by a new (tokens x features)
    mask from the module's generator, seeded by (pass seed, module index)."""
    model = lora(base, 0.3)
    posterior = MCDropout(model, mask="element")
    (_, module, rate), index = posterior.modules[0], 0
    seen = []
    with posterior.sample(5):  # a hook after the pass's own sees its output
        handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
        try:
            PairScorer(model, tiny_tokenizer, PAIRS, 2).scores()
        finally:
            handle.remove()
    assert len(seen) >= 2
    generator = torch.Generator().manual_seed(module_seed(5, index))
    masks = []
    for x, out in seen:  # the hook's output replaces the module's: x * a fresh mask, in call order
        mask = element_mask(x, rate, generator)
        torch.testing.assert_close(out, x * mask, rtol=0, atol=0)
        masks.append(mask)
    assert masks[0].shape == seen[0][0].shape and set(masks[0].unique().tolist()) <= {0.0, 1 / (1 - rate)}
    assert not torch.equal(masks[0], masks[1][: masks[0].shape[0], : masks[0].shape[1]])  # fresh per forward
    assert any(not torch.equal(m[..., :1, :], m[..., 1:2, :]) for m in masks)  # per token too (not per feature)


def test_element_masks_reproducible_by_seed_and_differ_from_feature_masks(base, tiny_tokenizer):
    model = lora(base, 0.3)
    element = MCDropout(model, mask="element")
    one, again = (probs(element, model, tiny_tokenizer, 3, 7) for _ in range(2))
    assert same(one, again)
    assert not any(torch.allclose(a, b, **F64) for a, b in zip(one, probs(element, model, tiny_tokenizer, 3, 8)))
    feature = probs(MCDropout(model), model, tiny_tokenizer, 3, 7)
    assert not any(torch.allclose(a, b, **F64) for a, b in zip(one, feature))
    assert same(probs(element, model, tiny_tokenizer, 0, 0), probs(PointEstimate(model), model, tiny_tokenizer, 0, 0))


def test_element_masks_keep_one_minus_p():
    x = torch.ones(400, 500)
    mask = element_mask(x, 0.3, torch.Generator().manual_seed(0))
    assert abs(float((mask > 0).double().mean()) - 0.7) < 4 * (0.21 / x.numel()) ** 0.5


def test_mask_kind_is_saved_and_checked(base, tiny_tokenizer, tmp_path):
    model = lora(base, 0.3)
    loaded = load_posterior(model, MCDropout(model, mask="element").save(str(tmp_path / "mc")))
    assert loaded.mask == "element" and loaded.config() == {"rate": None, "mask": "element"}
    with pytest.raises(InputError, match="^mask must be one of feature/element, got 'token'"):
        MCDropout(model, mask="token")


def test_the_packing_probe_runs_outside_the_samples(base, tiny_tokenizer):
    """The shared path's probe (packed scores == one by one) is decided once per base model: run inside a pass with
    fresh masks per forward it would fail and turn packing off for good."""
    model = lora(base, 0.3)  # a new base model: not probed yet
    probs(MCDropout(model, mask="element"), model, tiny_tokenizer, 2, 0)
    assert packing_is_exact(model)
