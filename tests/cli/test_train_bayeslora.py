"""train.py --adapter_name bayeslora: the KL term in the loss, its schedules and scaling, its logs, 4-bit bases."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_bayes.cli.train import main as train_main
from peft_bayes.errors import InputError
from peft_bayes.tuners.bayeslora import BayesLoraConfig, kl_schedule_factor


def _train(train_argv, llama_dir, data_file, out, *extra):
    # a checkpoint every step: the last one's trainer_state.json holds the whole log history
    argv = train_argv(llama_dir, data_file, out, "--adapter_name", "bayeslora", "--lora_r", "4", *extra)
    assert train_main([*argv, "--save_step", "1"]) == 0
    saved = json.loads((out / "train_args.json").read_text())
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    return saved, steps


def test_loss_is_nll_plus_scaled_kl(llama_dir, data_file, tmp_path, train_argv):
    out = tmp_path / "bayes"
    saved, steps = _train(
        train_argv,
        llama_dir,
        data_file,
        out,
        "--kl_schedule",
        "constant",
        "--kl_weight",
        "0.5",
        "--bayes_optimizer",
        "single",
    )
    assert len(steps) == 2 and saved["n_train"] == 32
    for entry in steps:
        # KL over 2 layers x (q, v) of r x d_in = 4 x 32 Gaussians vs N(0, 0.2^2): hundreds of nats at init.
        assert entry["kl"] > 100
        assert entry["kl_term"] == pytest.approx(0.5 * entry["kl"] / 32, rel=1e-4)
        assert entry["nll"] + entry["kl_term"] == pytest.approx(entry["loss"], rel=1e-4)
        assert 0 < entry["nll"] < 10  # a per-token cross entropy, not the KL
    assert saved["final_kl_nats"] > 100 and saved["kl_n_train"] == 32
    weights = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("bayeslora_rho") for k in weights)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BAYESLORA" and config["kl_weight"] == 0.5 and config["kl_schedule"] == "constant"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out)
    assert isinstance(model.peft_config["default"], BayesLoraConfig)
    assert model.kl_divergence().item() == pytest.approx(saved["final_kl_nats"], rel=0.05)


def test_blob_schedule_weights_follow_the_epoch(llama_dir, data_file, tmp_path, train_argv):
    # 32 examples, micro-batch 4, accumulation 2: M = 4 optimizer steps per epoch; run 6 steps (into epoch 2).
    out = tmp_path / "blob"
    argv = ("--max_steps", "6", "--num_epochs", "2", "--bayes_optimizer", "single")
    saved, steps = _train(train_argv, llama_dir, data_file, out, *argv)
    assert len(steps) == 6
    for i, entry in enumerate(steps):
        factor = kl_schedule_factor("blob", i, 4, 6)
        assert entry["kl_term"] == pytest.approx(factor * entry["kl"] / 32, rel=1e-4)
    ratios = [e["kl_term"] / e["kl"] for e in steps]
    assert ratios[1] == pytest.approx(2 * ratios[0], rel=1e-3) and ratios[4] == pytest.approx(ratios[0], rel=1e-3)


@pytest.mark.parametrize("schedule", ["blob", "constant", "linear"])
def test_schedule_factors(schedule):
    m, total = 5, 20
    factors = [kl_schedule_factor(schedule, s, m, total) for s in range(total)]
    if schedule == "blob":
        for epoch in range(total // m):
            assert sum(factors[epoch * m : (epoch + 1) * m]) / m == pytest.approx(1.0)  # averages 1 per epoch
        assert factors[1] / factors[0] == pytest.approx(2.0)
    elif schedule == "linear":
        assert factors[0] == pytest.approx(1 / total) and factors[-1] == 1.0
        assert kl_schedule_factor("linear", 9, m, total, anneal_steps=5) == 1.0
    else:
        assert set(factors) == {1.0}
    assert all(f >= 0 for f in factors) and kl_schedule_factor("blob", 3, 10_000, 10) >= 0  # no overflow


def test_kl_counts_once_per_optimizer_step_under_accumulation(llama_dir, tmp_path):
    """Whatever Trainer does to a micro-batch's loss, the KL term's share sums to one term per optimizer step."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    from peft_bayes.training import PeftBayesTrainer

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(base, BayesLoraConfig(task_type="CAUSAL_LM", r=4, kl_schedule="constant"))
    args = TrainingArguments(str(tmp_path), gradient_accumulation_steps=4, report_to=[], use_cpu=True)
    trainer = PeftBayesTrainer(model=peft_model, args=args, n_train=10, steps_per_epoch=3, bayes_optimizer="single")
    trainer.current_gradient_accumulation_steps = 4
    full = peft_model.kl_divergence().item() / 10
    trainer.loss_is_scaled_for_ga = True  # the model normalised by the whole batch's tokens: we divide
    assert trainer.kl_term().item() == pytest.approx(full / 4, rel=1e-6)
    trainer.loss_is_scaled_for_ga = False  # Trainer divides the micro-batch's loss by 4 itself
    assert trainer.kl_term().item() == pytest.approx(full, rel=1e-6)
    assert trainer.kl_summary()["final_kl_term"] == pytest.approx(full, rel=1e-6)


def test_trains_on_a_4bit_base(model_dirs, data_file, tmp_path, train_argv):
    out = tmp_path / "q4"
    argv = ("--load_4bit", "--learning_rate", "1e-2", "--bayes_optimizer", "single")
    saved, steps = _train(train_argv, model_dirs["llama"], data_file, out, *argv)
    assert saved["load_4bit"] and all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    weights = load_file(out / "adapter_model.safetensors")
    rho = [w for k, w in weights.items() if k.endswith("bayeslora_rho")]
    sigma = torch.cat([r.flatten() ** 2 for r in rho])
    # Initial sigma lies in [eps^2 / 2, eps^2] = [0.00125, 0.0025]; two Adam steps at lr 1e-2 move rho by ~0.02.
    assert sigma.min() >= 0 and ((sigma < 0.00125).any() or (sigma > 0.0025).any())


def test_bayes_flags_need_bayeslora(llama_dir, data_file, tmp_path, train_argv):
    with pytest.raises(InputError, match="--prior_std, --kl_schedule apply to --adapter_name bayeslora only"):
        train_main(train_argv(llama_dir, data_file, tmp_path / "x", "--prior_std", "0.1", "--kl_schedule", "linear"))
    assert not (tmp_path / "x").exists()


def test_bad_bayes_values_are_one_line(llama_dir, data_file, tmp_path, train_argv):
    argv = train_argv(llama_dir, data_file, tmp_path / "y", "--adapter_name", "bayeslora", "--prior_std", "0")
    with pytest.raises(InputError, match="--adapter_name bayeslora: prior_std must be a positive number"):
        train_main(argv)
