"""--choice_format letter (the Bayesian-LoRA papers' protocol) end to end, head adapters on tied embeddings, and
train.py's BLoB flags: --recipe blob, the short-run warning, checkpoints of the KL optimizer."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_bayes import BayesLoraConfig
from peft_bayes.cli.evaluate import main as evaluate_main
from peft_bayes.cli.train import RECIPES, parse_args
from peft_bayes.cli.train import main as train_main
from peft_bayes.data import Prompter, tokenize_letter_record
from peft_bayes.data.choices import letter_instruction, parse_choice_question
from peft_bayes.data.synthetic import make_choice_problems
from peft_bayes.posterior.likelihood import letter_logits
from peft_bayes.tiny import save_tiny_model
from peft_bayes.training import KL_OPTIMIZER_STATE, LetterCollator, PeftBayesTrainer


@pytest.fixture(scope="module")
def choice_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("letter") / "choice.json"
    path.write_text(json.dumps(make_choice_problems(24, seed=5)))
    return path


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaMA whose lm_head is its input embedding (as SmolLM2's)."""
    folder = tmp_path_factory.mktemp("tied") / "llama"
    return save_tiny_model(
        folder, "llama", tokenizer=tiny_tokenizer, hidden_size=32, num_heads=4, tie_word_embeddings=True
    )


def _letter_argv(train_argv, base, data, out, *extra):
    return train_argv(base, data, out, "--choice_format", "letter", *extra)


def test_evaluate_letter_equals_a_per_option_computation(llama_dir, choice_file, tmp_path):
    out = tmp_path / "eval"
    argv = ["--base_model", str(llama_dir), "--data_path", str(choice_file), "--output_dir", str(out),
            "--prompt_template", "alpaca_short", "--choice_format", "letter", "--samples", "0", "--quiet"]  # fmt: skip
    assert evaluate_main(argv) == 0
    predictions = json.loads((out / "choice_predictions.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompter = Prompter.from_name("alpaca_short")
    records = json.loads(choice_file.read_text())
    for record, row in zip(records, predictions):
        question = parse_choice_question(record)
        context = prompter.generate_prompt(letter_instruction(question)) + "Answer:"
        scores = []
        for letter in "ABCD"[: len(question.texts)]:  # each option as its own sequence: log p(letter | context)
            ids = tokenizer(context + " " + letter)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -2].double()
            scores.append(logits.log_softmax(-1)[ids[-1]])
        want = torch.stack(scores).softmax(-1)
        torch.testing.assert_close(torch.tensor(row["probs"], dtype=torch.float64), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adapter", ["lora", "bayeslora"])
def test_head_adapter_on_tied_embeddings_round_trips(adapter, tied_dir, choice_file, tmp_path, train_argv):
    out = tmp_path / adapter
    argv = _letter_argv(
        train_argv,
        tied_dir,
        choice_file,
        out,
        "--adapter_name",
        adapter,
        "--lora_r",
        "4",
        "--target_modules",
        "q_proj,v_proj,lm_head",
        "--max_steps",
        "3",
        "--save_step",
        "2",
        "--learning_rate",
        "5e-2",
    )
    assert train_main(argv) == 0
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lm_head.lora_A" in k for k in weights) and any("lm_head.lora_B" in k for k in weights)
    assert not any("embed_tokens" in k or "base_layer" in k for k in weights), "the tied embedding was saved"
    checkpoint = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert not any("embed_tokens" in k or "base_layer" in k for k in checkpoint)

    base = AutoModelForCausalLM.from_pretrained(tied_dir)
    embedding = base.get_input_embeddings().weight.detach().clone()
    model = PeftModel.from_pretrained(base, out).eval()
    assert model.get_output_embeddings().base_layer.weight is model.get_input_embeddings().weight  # still tied
    torch.testing.assert_close(model.get_input_embeddings().weight, embedding, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(tied_dir)
    rows = [
        tokenize_letter_record(r, tokenizer, Prompter.from_name("alpaca_short"), 64)
        for r in json.loads(choice_file.read_text())[:6]
    ]
    batch = LetterCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        adapted = letter_logits(model, batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
        with model.disable_adapter():
            plain = letter_logits(model, batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
    assert (adapted - plain).abs().max() > 1e-3, "the head adapter must change the letters' logits"


def test_trained_head_adapter_reloads_with_identical_outputs(tied_dir, choice_file, tmp_path):
    """In memory: train a head adapter a few steps, save, reload on a fresh base: the same letter logits."""
    from transformers import TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tied_dir)
    rows = [
        tokenize_letter_record(r, tokenizer, Prompter.from_name("alpaca_short"), 64)
        for r in json.loads(choice_file.read_text())[:8]
    ]
    config = BayesLoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tied_dir), config)
    args = TrainingArguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    PeftBayesTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=LetterCollator(tokenizer.pad_token_id),
        n_train=len(rows),
    ).train()
    model.save_pretrained(tmp_path / "saved", save_embedding_layers=False)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_dir), tmp_path / "saved").eval()
    batch = LetterCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        want = letter_logits(model.eval(), batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
        got = letter_logits(reloaded, batch["input_ids"], batch["attention_mask"], batch["choice_ids"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_recipe_blob_sets_the_authors_defaults_and_flags_override():
    args = parse_args(["--base_model", "m", "--recipe", "blob"])
    for key, value in RECIPES["blob"].items():
        assert getattr(args, key) == value, key
    assert args.adapter_name == "bayeslora" and args.learning_rate == 1e-4 and args.max_steps == 5000
    args = parse_args(["--base_model", "m", "--recipe", "blob", "--learning_rate", "2e-4", "--adapter_name", "lora"])
    assert args.learning_rate == 2e-4 and args.adapter_name == "lora" and args.choice_format == "letter"
    assert parse_args(["--base_model", "m"]).learning_rate == 3e-4  # no recipe: train.py's own defaults


def test_short_blob_run_warns_that_sigma_cannot_move(llama_dir, choice_file, tmp_path, train_argv):
    # 24 examples, global batch 8: M = int(100 * 24^(pi/8) / 8) = 43 steps; the run has 2.
    argv = _letter_argv(train_argv, llama_dir, choice_file, tmp_path / "short", "--adapter_name", "bayeslora")
    with pytest.warns(UserWarning, match="fewer than one KL cycle"):
        assert train_main(argv) == 0
    saved = json.loads((tmp_path / "short" / "train_args.json").read_text())
    assert saved["kl_cycle"] == 43 and saved["bayes_optimizer"] == "blob"
    assert len(saved["sigma_trajectory"]) == 2 and saved["sigma_trajectory"][0]["sigma_max"] < 0.0026


def test_blob_resume_from_checkpoint_equals_uninterrupted_run(llama_dir, choice_file, tmp_path, train_argv):
    """The KL optimizer's state travels with checkpoint-N; M = 3 steps per epoch so the KL acts before step 2."""
    opts = ["--adapter_name", "bayeslora", "--bayes_datasetrescaling", "false", "--max_steps", "4", "--save_step",
            "2", "--save_total_limit", "5", "--bayes_kllr", "0.05"]  # fmt: skip
    full = tmp_path / "full"
    assert train_main(_letter_argv(train_argv, llama_dir, choice_file, full, *opts)) == 0
    assert (full / "checkpoint-2" / KL_OPTIMIZER_STATE).is_file()
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-2", interrupted / "checkpoint-2")
    argv = _letter_argv(train_argv, llama_dir, choice_file, interrupted, *opts)
    assert train_main([*argv, "--resume_from_checkpoint", str(interrupted / "checkpoint-2")]) == 0
    a, b = load_file(full / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")
    mid = load_file(full / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], mid[k]) for k in a if k.endswith("bayeslora_rho"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
