"""Multi-process fitting: under ``torchrun`` every rank accumulates the curvature of its share of the batches, the
statistics are summed across ranks (all-reduce) before any eigendecomposition, and only rank 0 writes the posterior.
Sums do not depend on who added what, so N processes give one process's posterior up to the order of float sums."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def shard(items: Sequence) -> list:
    """This rank's share: items ``rank, rank + world, ...`` (every rank builds the same list)."""
    rank, world = rank_and_world()
    return list(items)[rank::world]


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sums each tensor over the ranks in place (no-op in one process)."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_scalars(values: Sequence[float]) -> list[float]:
    """Python floats summed over the ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce_sum_([t])
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def close_process_group(timeout_s: float = 120.0, exit_after: bool = False) -> None:
    """Under ``torchrun``: waits for every rank (rank 0 writes the outputs), then tears the process group down; a
    no-op without one.

    Left to interpreter exit, gloo's threads can outlive the interpreter and abort the process ("terminate called
    without an active exception"), so the group is destroyed explicitly. ``destroy_process_group`` itself hangs now
    and then (pytorch/pytorch#75097; in this project's CI once, a two-process run stuck after its training until it
    was killed at 600 s), so it runs in a thread given ``timeout_s``: past it, every rank has passed the barrier and
    the outputs are written, and the process says so on stderr and exits with status 0.

    ``exit_after``: once the group is down, end the process at once with status 0 (output flushed), skipping the
    interpreter's teardown. That teardown can deadlock too: freeing DDP's ``Reducer`` destroys its gloo process group
    while holding the GIL, and gloo's worker thread, still destroying the barrier's work, waits for the GIL (seen in
    this project's CI: the rank stuck in ``~ProcessGroupGloo`` and ``AsyncBarrierWork::~AsyncBarrierWork``). For a
    script's last step, after its outputs are written.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="destroy_process_group", daemon=True).start()
    if not done.wait(timeout_s):
        print(
            f"warning: torch.distributed.destroy_process_group did not return within {timeout_s:.0f} s; exiting "
            "(every rank had finished and the outputs are written)",
            file=sys.stderr,
            flush=True,
        )
        _exit_now()
    if exit_after:
        _exit_now()


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
