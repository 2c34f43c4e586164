"""SWAG and MultiSWAG (``posterior.swag``, ``posterior.multiswag``) against independent float64 computations.

The moments against numpy's mean / second moment / variance of the collected iterates; the samples' mean and
covariance against ½ s² (diag σ² + D Dᵀ / (K − 1)) by whitening 40 000 draws of 16 weights (a wrong 1/√2, 1/√(K − 1)
or √s moves the largest whitened covariance entry by ≥ 0.29 here, Monte-Carlo error leaves 0.016, the bound is 0.05);
the collector under a real ``transformers.Trainer`` against snapshots of the weights after every optimizer step and
against the learning rate each step's optimizer used; MultiSWAG against single SWAG posteriors pass by pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from peft_bayes.errors import InputError
from peft_bayes.posterior import MultiSwag, Swag, SwagCollector, SwagOptions, load_posterior, posterior_folder
from peft_bayes.posterior import swag as swag_module
from peft_bayes.posterior.base import sample_seed
from peft_bayes.posterior.swag import parse_swag_start, std_scale
from peft_bayes.tiny import build_tiny_model
from peft_bayes.tuners import BottleneckConfig


def base(tok, hidden=32, layers=2, heads=4):
    return build_tiny_model("llama", tok, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=0)


def lora(tok, **kw):
    config = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base(tok, **kw), config)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flat(model) -> np.ndarray:
    return np.concatenate([p.detach().double().numpy().ravel() for p in trainable(model)])


def feed(model, collector, n, scale=0.1, seed=0) -> np.ndarray:
    """Sets the trainable weights to n random iterates, collecting each; returns them (n, P) in float64."""
    gen = torch.Generator().manual_seed(seed)
    iterates = []
    for i in range(n):
        with torch.no_grad():
            for p in trainable(model):
                p.copy_(scale * torch.randn(p.shape, generator=gen) + 0.05 * i)
        collector.collect(i)
        iterates.append(flat(model))
    return np.stack(iterates)


def running_deviations(x: np.ndarray) -> np.ndarray:
    return np.stack([x[i] - x[: i + 1].mean(0) for i in range(len(x))])


def ids(tok, n=3, length=7):
    gen = torch.Generator().manual_seed(5)
    return torch.randint(4, len(tok), (n, length), generator=gen)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# --- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"start_epoch": 1.0, "start_step": 3}, "start_epoch"),
        ({"start_epoch": -1.0}, "start_epoch"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"anneal_epochs": float("nan")}, "anneal_epochs"),
        ({"anneal_strategy": "step"}, "anneal_strategy"),
        ({"collect_every": -2}, "collect_every"),
        ({"max_num_models": 1}, "max_num_models"),
        ({"sample_scale": -0.5}, "sample_scale"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(kwargs, field):
    with pytest.raises(InputError, match=f"^{field} ") as err:
        SwagOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_start_parses_epochs_and_steps():
    assert parse_swag_start("1.5") == {"start_epoch": 1.5, "start_step": None}
    assert parse_swag_start("300steps") == {"start_step": 300, "start_epoch": None}
    assert parse_swag_start("7 step") == {"start_step": 7, "start_epoch": None}
    with pytest.raises(InputError, match="^start_epoch must be an epoch"):
        parse_swag_start("soon")
    assert SwagOptions(max_num_models=1, cov_mat=False).max_num_models == 1


# --- moments -----------------------------------------------------------------------------------------------------
def test_moments_are_the_running_mean_and_second_moment(tiny_tokenizer):
    model = lora(tiny_tokenizer)
    collector = SwagCollector(model, SwagOptions(max_num_models=3))
    x = feed(model, collector, 5)
    assert collector.n_models == 5 and collector.collected_steps == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(collector.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(collector.sq_mean.numpy(), (x**2).mean(0), rtol=1e-12, atol=1e-15)
    swag = collector.posterior()
    np.testing.assert_allclose(swag.variance.numpy(), x.var(0), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(swag.deviations.numpy(), running_deviations(x)[-3:], rtol=1e-12, atol=1e-15)
    assert swag.rank == 3


def test_diagonal_only_keeps_no_deviations_and_variance_is_clamped(tiny_tokenizer):
    model = lora(tiny_tokenizer)
    collector = SwagCollector(model, SwagOptions(cov_mat=False))
    x = feed(model, collector, 3)
    swag = collector.posterior()
    assert swag.deviations.shape == (0, x.shape[1]) and swag.rank == 0
    swag.sq_mean = swag.mean_vec.square() - 1e-18  # cancellation below zero
    assert (swag.variance == 0).all()
    assert torch.equal(swag.draw(torch.Generator().manual_seed(0))[0], swag.mean_vec)


# --- samples -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cov_mat", [True, False])
def test_samples_have_the_mean_and_covariance_the_moments_imply(tiny_tokenizer, cov_mat):
    model = lora(tiny_tokenizer, hidden=8, layers=1, heads=2)  # LoRA r=2 on q, v: 64 weights; keep q's A: 16
    collector = SwagCollector(model, SwagOptions(max_num_models=3, cov_mat=cov_mat))
    x = feed(model, collector, 6, scale=0.3)
    swag = collector.posterior()
    swag.sample_scale = 0.7
    draws = swag.draw(torch.Generator().manual_seed(1), 40_000).numpy()
    keep = slice(0, 16)
    theta, var = x.mean(0), x.var(0)
    cov = np.diag(var) / 2 + running_deviations(x)[-3:].T @ running_deviations(x)[-3:] / (2 * 2)
    cov = 0.7**2 * (cov if cov_mat else np.diag(var))
    whiten = np.linalg.inv(np.linalg.cholesky(cov[keep, keep]))
    w = (draws[:, keep] - theta[keep]) @ whiten.T  # should be N(0, I)
    assert np.abs(w.mean(0)).max() < 0.03
    assert np.abs(w.T @ w / len(w) - np.eye(16)).max() < 0.05
    # the full vector: per-weight standard deviations (a whitening of all 64 would mostly test the same thing)
    np.testing.assert_allclose(draws.std(0), np.sqrt(np.diag(cov)), rtol=0.03)


def test_swag_lora_scale_convention(tiny_tokenizer):
    """swag-lora's sample θ̄ + √scale (σ ⊙ z₁ + D z₂ / √(K − 1)) by hand, with the same z's, equals ours at
    --swag_scale_convention swag_lora (s = √(2 scale)); its default scale 1.0 is s = √2."""
    model = lora(tiny_tokenizer, hidden=8, layers=1, heads=2)
    options = SwagOptions(max_num_models=3, sample_scale=1.0, scale_convention="swag_lora")
    assert options.std_scale == pytest.approx(math.sqrt(2)) and std_scale(0.5, "swag_lora") == pytest.approx(1.0)
    collector = SwagCollector(model, options)
    x = feed(model, collector, 6, scale=0.3)
    swag = collector.posterior()
    assert swag.sample_scale == pytest.approx(math.sqrt(2))
    draw = swag.draw(torch.Generator().manual_seed(4))[0].numpy()
    gen = torch.Generator().manual_seed(4)
    z1 = torch.randn((1, x.shape[1]), generator=gen, dtype=torch.float64)[0].numpy()
    z2 = torch.randn((1, 3), generator=gen, dtype=torch.float64)[0].numpy()
    dev = running_deviations(x)[-3:]
    by_hand = x.mean(0) + math.sqrt(1.0) * (np.sqrt(x.var(0)) * z1 + z2 @ dev / math.sqrt(3 - 1))
    np.testing.assert_allclose(draw, by_hand, rtol=1e-9, atol=1e-12)


def test_sample_holds_the_seeded_draw_and_contexts_restore_bit_exactly(tiny_tokenizer):
    model = lora(tiny_tokenizer)
    collector = SwagCollector(model, SwagOptions(max_num_models=4))
    feed(model, collector, 5)
    swag = collector.posterior()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with swag.sample(11):
        inside = torch.from_numpy(flat(model))
    expected = swag.draw(torch.Generator().manual_seed(11))[0].float().double()
    assert torch.equal(inside, expected)
    with swag.sample(11):
        assert torch.equal(torch.from_numpy(flat(model)), inside)
    with swag.sample(12):
        assert not torch.equal(torch.from_numpy(flat(model)), inside)
    with swag.mean():
        assert torch.equal(torch.from_numpy(flat(model)), swag.mean_vec.float().double())
    with pytest.raises(RuntimeError), swag.sample(3):
        raise RuntimeError("a failing pass")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scale_zero_is_the_swa_mean(tiny_tokenizer):
    model = lora(tiny_tokenizer)
    collector = SwagCollector(model, SwagOptions(max_num_models=3, sample_scale=0.0))
    feed(model, collector, 4)
    swag = collector.posterior()
    x = ids(tiny_tokenizer)
    with swag.mean():
        mean_logits = logits(model, x)
    for seed in (0, 1):
        with swag.sample(seed):
            assert torch.equal(logits(model, x), mean_logits)
    swag.sample_scale = 1.0
    with swag.sample(0):
        assert not torch.equal(logits(model, x), mean_logits)


# --- persistence -----------------------------------------------------------------------------------------------------
def saved_member(tok, folder, seed=0):
    """A LoRA adapter with a SWAG posterior of random iterates, saved as train.py would save them."""
    model = lora(tok)
    collector = SwagCollector(model, SwagOptions(max_num_models=3, sample_scale=0.5))
    feed(model, collector, 4, seed=seed)
    swag = collector.posterior()
    model.save_pretrained(folder)
    collector.save(posterior_folder(str(folder), "swag"))
    return model, swag


def test_save_load_gives_identical_predictions_and_refuses_other_adapters(tiny_tokenizer, tmp_path):
    model, swag = saved_member(tiny_tokenizer, tmp_path / "a")
    loaded_model = PeftModel.from_pretrained(base(tiny_tokenizer), tmp_path / "a")
    loaded = load_posterior(loaded_model, posterior_folder(str(tmp_path / "a"), "swag"))
    assert isinstance(loaded, Swag) and loaded.sample_scale == 0.5 and loaded.n_models == 4
    x = ids(tiny_tokenizer)
    for context, loaded_context in ((swag.mean(), loaded.mean()), (swag.sample(4), loaded.sample(4))):
        with context:
            want = logits(model, x)
        with loaded_context:
            assert torch.equal(logits(loaded_model, x), want)
    folder = posterior_folder(str(tmp_path / "a"), "swag")
    other = lora(tiny_tokenizer)  # same shapes, other weights
    with pytest.raises(InputError, match="fingerprint differs"):
        load_posterior(other, folder)
    elsewhere = get_peft_model(base(tiny_tokenizer), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["k_proj"]))
    with pytest.raises(InputError, match="covers other adapter weights"):
        load_posterior(elsewhere, folder)


def test_export_swa_round_trips_through_from_pretrained(tiny_tokenizer, tmp_path):
    model, swag = saved_member(tiny_tokenizer, tmp_path / "a")
    before = flat(model)
    swag.export_swa(str(tmp_path / "swa"))
    assert np.array_equal(flat(model), before)
    exported = PeftModel.from_pretrained(base(tiny_tokenizer), tmp_path / "swa")
    x = ids(tiny_tokenizer)
    with swag.mean():
        assert torch.equal(logits(exported, x), logits(model, x))
    assert not torch.equal(logits(exported, x), logits(model, x))


def test_collector_saves_on_rank_zero_only(tiny_tokenizer, tmp_path, monkeypatch):
    model = lora(tiny_tokenizer)
    collector = SwagCollector(model, SwagOptions(max_num_models=3))
    feed(model, collector, 2)
    monkeypatch.setattr(swag_module, "is_main_process", lambda: False)
    collector.save(str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


# --- under a real Trainer ----------------------------------------------------------------------------------------
class Recorder(TrainerCallback):
    """The learning rate each optimizer step used, and the trainable weights after every step (float64)."""

    def __init__(self, model):
        self.model, self.lrs, self.weights = model, {}, {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = flat(self.model)


def train(model, options, tmp_path, tok, epochs=3):
    """8 examples, batch 2: 4 optimizer steps per epoch; linear schedule from 1e-2 without warm-up."""
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(4, len(tok), (8, 10), generator=gen).tolist()]
    args = TrainingArguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_train_epochs=epochs,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    collector, recorder = SwagCollector(model, options), Recorder(model)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.add_callback(collector)
    trainer.add_callback(recorder)
    trainer.train()
    return collector, recorder


def bottleneck(tok):
    config = BottleneckConfig(task_type="CAUSAL_LM", preset="adapterp", bottleneck_size=4, init_weights="bert")
    return get_peft_model(base(tok), config)


@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
@pytest.mark.parametrize(
    "options, steps",
    [
        ({"start_epoch": 1.0, "collect_every": 2}, [6, 8, 10, 12]),
        ({"start_epoch": 1.0}, [8, 12]),  # once an epoch
        ({"start_step": 5, "collect_every": 3}, [8, 11]),
        ({}, [7, 8, 9, 10, 11, 12]),  # default start: half way
    ],
)
def test_trainer_collects_the_expected_models(tiny_tokenizer, tmp_path, adapter, options, steps):
    model = lora(tiny_tokenizer) if adapter == "lora" else bottleneck(tiny_tokenizer)
    if not options:
        options = {"collect_every": 1}
    collector, recorder = train(model, SwagOptions(max_num_models=3, **options), tmp_path, tiny_tokenizer)
    assert collector.collected_steps == steps
    x = np.stack([recorder.weights[s] for s in steps])
    assert len(np.unique(x, axis=0)) == len(steps)  # the weights did move between collections
    swag = collector.posterior()
    np.testing.assert_allclose(swag.mean_vec.numpy(), x.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(swag.variance.numpy(), x.var(0), rtol=1e-7, atol=1e-15)
    np.testing.assert_allclose(swag.deviations.numpy(), running_deviations(x)[-3:], rtol=1e-12, atol=1e-15)
    # the sha256 of the trained weights' float32 bytes, written out: saved posteriors keep matching their adapters
    digest = hashlib.sha256()
    for p in trainable(model):
        digest.update(p.detach().float().numpy().tobytes())
    assert swag.fingerprint == digest.hexdigest()


def scheduled(step, total=12, lr=1e-2):
    return lr * (total - (step - 1)) / total  # linear decay, no warm-up: step 1 uses lr


@pytest.mark.parametrize("strategy", ["constant", "linear", "cosine"])
def test_learning_rate_after_the_start_follows_the_strategy(tiny_tokenizer, tmp_path, strategy):
    swag_lr, start, anneal = 2e-3, 4, 4  # anneal over 1 epoch = 4 steps
    options = SwagOptions(start_step=start, learning_rate=swag_lr, anneal_epochs=1.0, anneal_strategy=strategy)
    collector, recorder = train(lora(tiny_tokenizer), options, tmp_path, tiny_tokenizer)
    lr0 = scheduled(start + 1)
    for step in range(1, 13):
        if step <= start:
            want = scheduled(step)
        else:
            t = min(1.0, (step - start) / anneal)
            alpha = {"constant": 1.0, "linear": t, "cosine": (1 - math.cos(math.pi * t)) / 2}[strategy]
            want = (1 - alpha) * lr0 + alpha * swag_lr
        assert recorder.lrs[step] == pytest.approx(want, rel=1e-12), step
    assert collector.learning_rates == {s: recorder.lrs[s] for s in range(start + 1, 13)}
    assert collector.collected_steps == [8, 12]


def test_no_swag_learning_rate_keeps_the_schedule(tiny_tokenizer, tmp_path):
    _, recorder = train(lora(tiny_tokenizer), SwagOptions(start_step=2), tmp_path, tiny_tokenizer, epochs=1)
    assert recorder.lrs == pytest.approx({s: scheduled(s, total=4) for s in range(1, 5)}, rel=1e-12)


def test_start_after_the_end_is_an_error(tiny_tokenizer, tmp_path):
    with pytest.raises(InputError, match="^start_epoch is at step 8, at or after the end of training"):
        train(lora(tiny_tokenizer), SwagOptions(start_epoch=2.0), tmp_path, tiny_tokenizer, epochs=1)


# --- MultiSWAG -------------------------------------------------------------------------------------------------------
class Scorer:
    """Option scores: the last position's logits of the first 5 tokens, per example."""

    def __init__(self, model, x):
        self.model, self.x, self.n_examples = model, x, len(x)

    def scores(self, progress=None):
        return list(logits(self.model, self.x)[:, -1, :5].double())


def single_probs(tok, folder, seeds, x):
    """Option probabilities of one member's SWAG, averaged over the given sample seeds (None: its mean)."""
    model = PeftModel.from_pretrained(base(tok), folder)
    swag = Swag.load(model, posterior_folder(str(folder), "swag"))
    probs = []
    for seed in seeds:
        with swag.mean() if seed is None else swag.sample(seed):
            probs.append(logits(model, x)[:, -1, :5].double())
    return torch.stack([p.softmax(-1) for p in probs]).mean(0)


def test_multiswag_of_identical_members_is_one_swag(tiny_tokenizer, tmp_path):
    saved_member(tiny_tokenizer, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    multi = MultiSwag.from_folders(base(tiny_tokenizer), [str(tmp_path / "a"), str(tmp_path / "b")])
    x = ids(tiny_tokenizer)
    got = torch.stack(multi.option_probs(Scorer(multi.model, x), 4, seed=3))
    want = single_probs(tiny_tokenizer, tmp_path / "a", [sample_seed(3, i) for i in range(4)], x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got0 = torch.stack(multi.option_probs(Scorer(multi.model, x), 0, seed=3))
    torch.testing.assert_close(got0, single_probs(tiny_tokenizer, tmp_path / "a", [None], x), rtol=0, atol=1e-12)


def test_multiswag_draws_member_i_mod_m_and_saves(tiny_tokenizer, tmp_path):
    saved_member(tiny_tokenizer, tmp_path / "a", seed=0)
    saved_member(tiny_tokenizer, tmp_path / "b", seed=1)
    multi = MultiSwag.from_folders(base(tiny_tokenizer), [str(tmp_path / "a"), str(tmp_path / "b")])
    before = {k: v.clone() for k, v in multi.model.state_dict().items()}
    x = ids(tiny_tokenizer)
    got = torch.stack(multi.option_probs(Scorer(multi.model, x), 4, seed=7))
    a = single_probs(tiny_tokenizer, tmp_path / "a", [sample_seed(7, 0), sample_seed(7, 2)], x)
    b = single_probs(tiny_tokenizer, tmp_path / "b", [sample_seed(7, 1), sample_seed(7, 3)], x)
    torch.testing.assert_close(got, (a + b) / 2, rtol=0, atol=1e-12)
    assert all(torch.equal(v, multi.model.state_dict()[k]) for k, v in before.items())
    assert multi.model.active_adapter == "swag0"
    multi.save(str(tmp_path / "multi"))
    again = load_posterior(multi.model, str(tmp_path / "multi"))
    assert isinstance(again, MultiSwag) and again.members == multi.members
    torch.testing.assert_close(torch.stack(again.option_probs(Scorer(multi.model, x), 4, seed=7)), got)
    assert multi.resolve_samples(None) == 10 and multi.resolve_samples(6) == 6
    with pytest.raises(InputError, match="multiple of the 2 MultiSWAG members"):
        multi.resolve_samples(3)


def test_multiswag_refuses_members_of_different_base_models(tiny_tokenizer, tmp_path):
    saved_member(tiny_tokenizer, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    config_path = tmp_path / "b" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "some/other-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="different base models"):
        MultiSwag.from_folders(base(tiny_tokenizer), [str(tmp_path / "a"), str(tmp_path / "b")])
