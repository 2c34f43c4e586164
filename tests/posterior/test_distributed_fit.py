"""torchrun --nproc_per_node=2 (gloo, CPU): two processes, each fitting its share of the batches with the sums
all-reduced, give one process's Laplace posterior: the same factors, marginal likelihood and saved files."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_fit_worker.py")
# float64 model and statistics: the two runs differ only in the order of the float sums (per rank, then the
# all-reduce), ~1e-16 relative per addition; 1e-10 leaves room for the eigendecompositions and the prior search.
RTOL = 1e-10


def _basis_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Low-rank factors (U, λ, ρ) as their dense U diag(λ) Uᵀ: eigenvectors are defined up to sign."""
    from peft_bayes.posterior.lowrank import EigenFactor

    out = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] + ".U" not in state}
    for key in [k for k in state if k.endswith(".U")]:
        prefix = key[: -len(".U")]
        factor = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        out[prefix] = EigenFactor.from_state_dict(factor).to_dense()
    return out


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.parametrize(
    "structure, fisher, rank, port, rtol",
    [
        ("kron", "mc", [], "29541", RTOL),
        ("full", "exact", [], "29542", RTOL),
        # low-rank factors (width > 8 streamed): at rank 64 every eigenpair of these <= 64-wide factors is kept, so
        # merging the two processes' streams is exact; at rank 12 each process truncates its own stream before the
        # merge, which moves the result by the truncation error only (stated tolerance 1e-3)
        ("kron", "exact", ["64"], "29543", RTOL),
        ("kron", "exact", ["12"], "29544", 1e-3),
    ],
)
def test_two_processes_fit_one_process_posterior(structure, fisher, rank, port, rtol, tmp_path, run_or_dump_stacks):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_or_dump_stacks([sys.executable, str(WORKER), str(single), structure, fisher, *rank], ENV)
    run_or_dump_stacks(
        ["torchrun", "--nproc_per_node=2", f"--master_port={port}", str(WORKER), str(multi), structure, fisher, *rank],
        ENV,
    )
    a, b = (_basis_free(load_file(d / "posterior.safetensors")) for d in (single, multi))
    assert a.keys() == b.keys() and len(a) > 1
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=rtol * float(a[key].abs().max()), msg=key)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (single, multi))
    assert ra["n_data"] == rb["n_data"] == 10
    assert rb["lml"] == pytest.approx(ra["lml"], rel=rtol)
    ca, cb = (json.loads((d / "posterior_config.json").read_text()) for d in (single, multi))
    assert ca["fingerprint"] == cb["fingerprint"] and ca["loglik"] == pytest.approx(cb["loglik"], rel=RTOL)
    truncated = min(ca["captured_mass"]) < 0.999  # only the rank-12 case drops eigenvalue mass
    assert truncated == (rtol != RTOL)


CLOSE = """
import sys, time
import torch.distributed as dist
from peft_bayes.posterior.distributed import close_process_group

dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
if sys.argv[1] == "hang":
    dist.destroy_process_group = lambda: time.sleep(600)  # a teardown that never returns
print("outputs written")  # not flushed: the exit must flush it
close_process_group(timeout_s=2, exit_after=sys.argv[1] == "exit")
print("closed; group initialized:", dist.is_initialized())
"""


@pytest.mark.parametrize("teardown", ["returns", "hang", "exit"])
def test_close_process_group_destroys_the_group_and_bounds_a_hanging_teardown(teardown, tmp_path, run_or_dump_stacks):
    """The normal path destroys the group; a destroy_process_group that never returns (pytorch#75097) ends the
    process after the timeout with status 0, a warning, and what it had printed; ``exit_after`` (train.py's last
    step) ends it right after the teardown, with what it had printed and nothing after."""
    proc = run_or_dump_stacks([sys.executable, "-c", CLOSE, teardown, str(tmp_path / "store")], ENV, timeout=120)
    if teardown == "returns":
        assert proc.stdout.splitlines() == ["outputs written", "closed; group initialized: False"]
        assert "warning" not in proc.stderr
    elif teardown == "exit":
        assert proc.stdout.splitlines() == ["outputs written"] and "warning" not in proc.stderr
    else:
        assert proc.stdout.splitlines() == ["outputs written"]
        assert "destroy_process_group did not return within 2 s" in proc.stderr
