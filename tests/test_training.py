"""peft_bayes.training: BLoB's two optimizers against a hand-written loop of the authors' algorithm, its KL weights
and cycle against their formulas, the letter format's K-way loss, gradient accumulation, and sigma's growth."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import TrainingArguments, get_linear_schedule_with_warmup

from peft_bayes.data import Prompter, tokenize_letter_record
from peft_bayes.data.synthetic import make_choice_problems
from peft_bayes.posterior.likelihood import letter_logits
from peft_bayes.tiny import build_tiny_model
from peft_bayes.training import LetterCollator, PeftBayesTrainer, bayes_parameters, sigma_stats, warn_short_run
from peft_bayes.tuners.bayeslora import (
    BayesLoraConfig,
    bayes_layers,
    blob_cycle_length,
    blob_kl_weight,
    posterior_sample,
)


# --- pi and M against their formulas -----------------------------------------------------------------------------
@pytest.mark.parametrize("cycle", [1, 3, 7])
def test_blob_kl_weight_is_the_papers_formula(cycle):
    for step in range(1, 3 * cycle + 1):
        i = step % cycle or cycle  # the authors' counter: i = t mod M, M when divisible
        assert blob_kl_weight(step, cycle) == pytest.approx(2**i / (2 ** (cycle + 1) - 1), rel=1e-12)
    total = sum(blob_kl_weight(s, cycle) for s in range(1, cycle + 1))
    assert total == pytest.approx((2 ** (cycle + 1) - 2) / (2 ** (cycle + 1) - 1), rel=1e-12)
    assert blob_kl_weight(5000, 5000) == pytest.approx(0.5)  # no overflow for long cycles
    with pytest.raises(ValueError):
        blob_kl_weight(0, 3)


def test_blob_cycle_length_matches_the_data_set_rescaling():
    # M = int(100 N^(pi / gamma) / batch): the values the authors' code prints for these sizes
    assert blob_cycle_length(400, 16, 25) == 65
    assert blob_cycle_length(800, 16, 50) == 86
    assert blob_cycle_length(2251, 4, 563) == 518
    assert blob_cycle_length(2251, 4, 563, gamma=4) == int(100 * 2251 ** (math.pi / 4) / 4)
    assert blob_cycle_length(2251, 4, 563, rescaling=False) == 563  # the steps of one epoch


def test_short_run_warns_once_it_cannot_reach_a_cycle():
    with pytest.warns(UserWarning, match="fewer than one KL cycle"):
        assert warn_short_run(50, 86)
    assert not warn_short_run(86, 86)


# --- a tiny float64 problem ---------------------------------------------------------------------------------------
def _letter_rows(tokenizer, n: int) -> list[dict]:
    prompter = Prompter.from_name("alpaca_short")
    records = make_choice_problems(n, seed=3)
    return [tokenize_letter_record(r, tokenizer, prompter, 256, f"record {i}") for i, r in enumerate(records)]


def _bayes_model(tokenizer, targets=("q_proj", "v_proj"), seed=0, **config):
    torch.manual_seed(seed)
    base = build_tiny_model("llama", tokenizer, hidden_size=32, num_heads=4, seed=1).double()
    cfg = BayesLoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    for key, value in config.items():
        setattr(cfg, key, value)
    return get_peft_model(base, cfg)


def _args(tmp_path, steps: int, batch: int, accum: int = 1, **kw) -> TrainingArguments:
    return TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-2,
        warmup_steps=2,
        adam_epsilon=1e-6,
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def _trainer(model, rows, tokenizer, args, **kw) -> PeftBayesTrainer:
    return PeftBayesTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=LetterCollator(tokenizer.pad_token_id),
        n_train=len(rows),
        **kw,
    )


def _independent_kl(model) -> torch.Tensor:
    """KL(q || p) summed over the Bayesian factors, by torch.distributions (not the library's closed form)."""
    total = 0.0
    for _, layer in bayes_layers(model):
        for name in layer.active_adapters:
            if name in layer.bayeslora_rho:
                rho = layer.bayeslora_rho[name]
                mean = layer.lora_A[name].weight
                q = torch.distributions.Normal(mean, rho * rho)
                p = torch.distributions.Normal(torch.zeros_like(mean), torch.full_like(mean, 0.2))
                total = total + torch.distributions.kl_divergence(q, p).sum()
    return total


def test_two_optimizer_step_equals_the_authors_loop(tiny_tokenizer, tmp_path):
    """Trainer + BlobKLOptimizer == AdamW over the means and B (not rho), then SGD over (A, rho) on pi * KL, by hand.

    One fixed posterior draw (``posterior_sample``) makes both runs deterministic while rho still gets an NLL
    gradient through sigma * E; the one batch holds every example, so the data order cannot differ."""
    rows = _letter_rows(tiny_tokenizer, 4)
    steps, cycle, kllr = 5, 3, 0.05
    trained = _bayes_model(tiny_tokenizer)
    reference = _bayes_model(tiny_tokenizer)
    torch.testing.assert_close(dict(trained.named_parameters()), dict(reference.named_parameters()))
    trainer = _trainer(trained, rows, tiny_tokenizer, _args(tmp_path, steps, 4), kl_cycle=cycle, kllr=kllr)
    with posterior_sample(trained, seed=7):
        trainer.train()

    # the authors' loop (bayesian-peft modelwrappers/blob.py fit), written out
    means, rhos = bayes_parameters(reference)
    rho_ids = {id(p) for p in rhos}
    adam_params = [p for p in reference.parameters() if p.requires_grad and id(p) not in rho_ids]
    adamw = torch.optim.AdamW(adam_params, lr=1e-2, eps=1e-6, weight_decay=0.0)
    sgd = torch.optim.SGD(means + rhos, lr=kllr)
    schedules = [get_linear_schedule_with_warmup(o, 2, steps) for o in (adamw, sgd)]
    batch = LetterCollator(tiny_tokenizer.pad_token_id)(rows)
    reference.train()
    with posterior_sample(reference, seed=7):
        for t in range(1, steps + 1):
            logits = letter_logits(reference, batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
            torch.nn.functional.cross_entropy(logits, batch["choice_label"]).backward()
            adamw.step()
            adamw.zero_grad()
            schedules[0].step()
            i = t % cycle or cycle
            (2**i / (2 ** (cycle + 1) - 1) * _independent_kl(reference)).backward()
            sgd.step()
            sgd.zero_grad()
            schedules[1].step()
    got, want = dict(trained.named_parameters()), dict(reference.named_parameters())
    moved = max((want[k] - p).abs().max().item() for k, p in _bayes_model(tiny_tokenizer).named_parameters())
    assert moved > 1e-3, "the reference loop must move the weights for the comparison to mean anything"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_rho_is_not_in_adamw_and_returns_to_training(tiny_tokenizer, tmp_path):
    model = _bayes_model(tiny_tokenizer)
    trainer = _trainer(model, _letter_rows(tiny_tokenizer, 4), tiny_tokenizer, _args(tmp_path, 2, 4))
    trainer.create_optimizer()
    in_adam = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    _, rhos = bayes_parameters(model)
    assert rhos and not any(id(p) in in_adam for p in rhos) and all(p.requires_grad for p in rhos)
    single = _trainer(model, trainer.train_dataset, tiny_tokenizer, _args(tmp_path, 2, 4), bayes_optimizer="single")
    single.create_optimizer()
    in_adam = {id(p) for group in single.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_adam for p in rhos)


def test_gradient_accumulation_2x2_equals_batch_4(tiny_tokenizer, tmp_path):
    rows = _letter_rows(tiny_tokenizer, 4)
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        model = _bayes_model(tiny_tokenizer)
        trainer = _trainer(model, rows, tiny_tokenizer, _args(tmp_path / f"{batch}", 3, batch, accum), kl_cycle=2)
        with posterior_sample(model, seed=3):
            trainer.train()
        results.append(dict(model.named_parameters()))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-9, atol=1e-11, msg=name)


def test_letter_logits_equal_an_independent_per_example_computation(tiny_tokenizer):
    rows = _letter_rows(tiny_tokenizer, 5)
    model = _bayes_model(tiny_tokenizer, targets=("q_proj", "v_proj", "lm_head")).eval()
    batch = LetterCollator(tiny_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        got = letter_logits(model, batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
        for i, row in enumerate(rows):  # one unpadded forward per example, full logits, last position
            full = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, -1]
            torch.testing.assert_close(got[i], full[row["choice_ids"]], rtol=1e-10, atol=1e-10)


def test_sigma_grows_with_blob_and_stays_with_one_adamw(tiny_tokenizer, tmp_path):
    """200 steps at BLoB's learning rate 1e-4 on 16 questions (M = 37, five KL cycles): BLoB's SGD on the KL drives
    sigma up several-fold; in one AdamW rho moves at most ~lr per step (<= 0.02 here), so sigma stays near its start.
    """
    rows = _letter_rows(tiny_tokenizer, 16)
    start = sigma_stats(_bayes_model(tiny_tokenizer))["sigma_mean"]
    final = {}
    for optimizer in ("blob", "single"):
        model = _bayes_model(tiny_tokenizer).float()
        args = TrainingArguments(
            str(tmp_path / optimizer),
            per_device_train_batch_size=8,
            max_steps=200,
            learning_rate=1e-4,
            warmup_steps=12,
            adam_epsilon=1e-6,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=50,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = _trainer(model, rows, tiny_tokenizer, args, bayes_optimizer=optimizer)
        assert optimizer == "single" or trainer.kl_optimizer.cycle == 37
        trainer.train()
        final[optimizer] = sigma_stats(model)["sigma_mean"]
        assert [e["step"] for e in trainer.sigma_history] == [50, 100, 150, 200]
    assert final["blob"] > 5 * start
    assert start / 2 < final["single"] < 2.5 * start
