"""Stopping after a checkpoint and resuming with --resume_from_checkpoint gives the uninterrupted run's adapter."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from peft_bayes.cli.train import main as train_main


def test_resume_from_checkpoint_equals_uninterrupted_run(llama_dir, data_file, tmp_path, train_argv):
    # 4 optimizer steps with dropout on (so the restored RNG state matters), checkpoints every 2 steps.
    opts = ["--max_steps", "4", "--save_step", "2", "--save_total_limit", "5", "--lora_dropout", "0.1"]
    full = tmp_path / "full"
    assert train_main([*train_argv(llama_dir, data_file, full), *opts]) == 0
    assert (full / "checkpoint-2" / "trainer_state.json").is_file()

    # The "interrupted" run: only what existed after step 2 survives.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-2", interrupted / "checkpoint-2")
    argv = [*train_argv(llama_dir, data_file, interrupted), *opts]
    assert train_main([*argv, "--resume_from_checkpoint", str(interrupted / "checkpoint-2")]) == 0
    assert json.loads((interrupted / "train_args.json").read_text())["optimizer_steps"] == 4

    a = load_file(full / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    mid = load_file(full / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], mid[k]) for k in a), "steps 3-4 must change the adapter"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_resume_from_adapter_folder_loads_weights(llama_dir, data_file, tmp_path, train_argv):
    """LLM-Adapters' other resume: a bare adapter folder restarts the schedule from its weights."""
    first = tmp_path / "first"
    assert train_main(train_argv(llama_dir, data_file, first)) == 0
    second = tmp_path / "second"
    argv = [*train_argv(llama_dir, data_file, second), "--resume_from_checkpoint", str(first), "--learning_rate", "0"]
    assert train_main(argv) == 0
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    for k in a:  # learning rate 0: the second run keeps the loaded weights exactly
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
