"""torchrun --nproc_per_node=2 (gloo, CPU) trains the same adapter as one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

# Same global batch (4) either way: 1 process x 2 micro-batches of 2, or 2 processes x 1 micro-batch of 2.
# The two runs differ only in the order of floating-point sums (all-reduce vs. accumulation), so the adapters
# agree to float32 rounding; 1e-5 is ~1e-4 of the weights' size and far below one step's change (~1e-3).
ATOL = 1e-5


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def single_and_two_processes(run_or_dump_stacks):
    return lambda *args: _single_and_two_processes(run_or_dump_stacks, *args)


def _single_and_two_processes(run, train_argv, llama_dir, data_file, tmp_path, common, port: int):
    """train.py in one process into ``tmp_path/single`` and under torchrun (2 gloo processes) into
    ``tmp_path/ddp`` with the same flags; (single folder, ddp folder, torchrun's completed process)."""
    single, multi = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, "train.py", *train_argv(llama_dir, data_file, single), *common], ENV)
    proc = run(
        [
            "torchrun",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "train.py",
            *train_argv(llama_dir, data_file, multi),
            *common,
        ],
        ENV,
    )
    return single, multi, proc


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_two_processes_matches_single_process(
    llama_dir, data_file, tmp_path, train_argv, single_and_two_processes
):
    common = ["--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3", "--lora_dropout", "0"]
    single, multi, proc = single_and_two_processes(train_argv, llama_dir, data_file, tmp_path, common, 29533)
    assert "grad accumulation 1 x 2 process(es)" in proc.stdout

    a = load_file(single / "adapter_model.safetensors")
    b = load_file(multi / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    init_b = 0.0  # LoRA B starts at zero: its size after 3 steps is the size of the training signal
    moved = max(float((a[k] - init_b).abs().max()) for k in a if "lora_B" in k)
    assert moved > 100 * ATOL, "training did not move the adapter enough for the comparison to mean anything"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)


# BLoB's optimizers: M = 8 steps per epoch (no data-set rescaling), so pi > 0 from step 1; --bayes_kllr 1e-9 keeps
# sigma ~1e-12 (deterministic runs) while the KL's SGD step on rho (~1e-9 * pi * 2 / rho) still moves it.
OPTIMIZER_FLAGS = {
    "single": ["--bayes_optimizer", "single", "--kl_schedule", "constant"],
    "blob": ["--bayes_optimizer", "blob", "--bayes_datasetrescaling", "false", "--bayes_kllr", "1e-9"],
}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.parametrize("optimizer", ["single", "blob"])
def test_torchrun_bayeslora_counts_the_kl_term_once(
    optimizer, llama_dir, data_file, tmp_path, train_argv, single_and_two_processes
):
    """Under DDP the KL term must enter each optimizer step once, as in one process with accumulation (blob: every
    rank steps the same SGD on the same all-reduced NLL gradient of rho plus the KL's).

    With --bayes_eps 1e-6 the posterior std is ~1e-12, so the sampled noise is far below the tolerance and both runs
    are deterministic, while the KL term (large: log sigma) still drives the update of rho and the means.
    """
    common = ["--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3", "--lora_dropout", "0",
              "--adapter_name", "bayeslora", "--bayes_eps", "1e-6", *OPTIMIZER_FLAGS[optimizer]]  # fmt: skip
    port = 29534 if optimizer == "single" else 29539
    single, multi, proc = single_and_two_processes(train_argv, llama_dir, data_file, tmp_path, common, port)
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(multi / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("bayeslora_rho") for k in a)
    if optimizer == "blob":  # rho starts in U(eps / sqrt(2), eps): the KL's SGD step must have pushed it out
        assert min(float(v.min()) for k, v in a.items() if k.endswith("bayeslora_rho")) > 1e-6
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=ATOL, msg=k)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI is not on PATH")
def test_accelerate_launch_runs_train_py(llama_dir, data_file, tmp_path, train_argv, run_or_dump_stacks):
    """`accelerate launch` drives the same script (on CPU its launcher runs one process; MPI is needed for more)."""
    common = ["--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "2", "--lora_dropout", "0"]
    plain, launched = tmp_path / "plain", tmp_path / "launched"
    run_or_dump_stacks([sys.executable, "train.py", *train_argv(llama_dir, data_file, plain), *common], ENV)
    run_or_dump_stacks(
        [
            "accelerate",
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "train.py",
            *train_argv(llama_dir, data_file, launched),
            *common,
        ],
        ENV,
    )
    a = load_file(plain / "adapter_model.safetensors")
    b = load_file(launched / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_train_fits_laplace_on_all_the_data(
    llama_dir, data_file, tmp_path, train_argv, single_and_two_processes
):
    """train.py --posterior laplace under torchrun: every rank fits its share, the sums are all-reduced, rank 0
    saves; the posterior covers every training example and matches one process's (same adapter up to 1e-5)."""
    import json

    common = ["--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "2", "--lora_dropout", "0",
              "--posterior", "laplace"]  # fmt: skip
    single, multi, proc = single_and_two_processes(train_argv, llama_dir, data_file, tmp_path, common, 29535)
    a, b = (json.loads((d / "posterior" / "laplace" / "posterior_config.json").read_text()) for d in (single, multi))
    n_records = len(json.loads(Path(data_file).read_text()))
    assert a["n_data"] == b["n_data"] == n_records
    assert b["log_marginal_likelihood"] == pytest.approx(a["log_marginal_likelihood"], rel=1e-3)
    assert b["loglik"] == pytest.approx(a["loglik"], rel=1e-3)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_swag_collects_once_the_synchronised_weights(
    llama_dir, data_file, tmp_path, train_argv, single_and_two_processes
):
    """train.py --posterior swag under torchrun: every rank collects the same (all-reduced) weights, rank 0 saves
    one posterior, equal to one process's with the same global batch (to float32 rounding, as the adapters)."""
    import json

    common = ["--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3", "--lora_dropout", "0",
              "--posterior", "swag", "--swag_start", "0steps", "--swag_collect_every", "1"]  # fmt: skip
    single, multi, proc = single_and_two_processes(train_argv, llama_dir, data_file, tmp_path, common, 29536)
    folders = [d / "posterior" / "swag" for d in (single, multi)]
    configs = [json.loads((f / "posterior_config.json").read_text()) for f in folders]
    assert configs[0]["n_models"] == configs[1]["n_models"] == 3
    assert configs[0]["collected_steps"] == configs[1]["collected_steps"] == [1, 2, 3]
    a, b = (load_file(f / "posterior.safetensors") for f in folders)
    assert a.keys() == b.keys() and len(a) >= 3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5 * max(1.0, float(a[k].abs().max())), msg=k)
