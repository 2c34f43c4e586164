"""The running sums behind one Kronecker factor (``A = Σ a aᵀ`` or ``G = Σ g gᵀ``) of a K-FAC Laplace fit.

- ``DenseFactor``: the (d, d) sum, accumulated in its upper triangle by the K-FAC statistics kernels
  (``peft_bayes.kernels.kfac``: Triton on CUDA tensors, the reference elsewhere; no fp32 copy of the activations)
  and mirrored once at the end;
- ``StreamFactor``: for factors above ``kfac_threshold``, the top ``kfac_rank`` eigenpairs plus one scalar for the
  rest, accumulated as a stream (``peft_bayes.posterior.lowrank.StreamingEigen``): the d × d sum never exists.

Both take the rows ``x`` (R, T, d) or (N, d) with an optional token ``mask`` and ``row_weight`` per row, and are
summed over the ranks of ``torchrun`` by ``all_reduce``.
"""

from __future__ import annotations

import torch

from peft_bayes.kernels.kfac import accumulate_gram_, mirror_upper_
from peft_bayes.posterior.distributed import all_reduce_sum_, rank_and_world
from peft_bayes.posterior.lowrank import EigenFactor, StreamingEigen


class DenseFactor:
    """The full (d, d) sum in ``dtype``."""

    def __init__(self, dim: int, dtype: torch.dtype, device) -> None:
        self.sum = torch.zeros((dim, dim), dtype=dtype, device=device)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> None:
        accumulate_gram_(self.sum, x.detach(), mask, row_weight)

    def all_reduce(self) -> None:
        all_reduce_sum_([self.sum])

    def result(self, scale: float = 1.0) -> torch.Tensor:
        """The symmetric sum times ``scale``."""
        return mirror_upper_(self.sum.clone()) * scale

    @property
    def captured_mass(self) -> float:
        return 1.0


class StreamFactor:
    """Top-``rank`` eigenpairs + one scalar of the sum (a float64 stream; the result in ``dtype``, as dense ones)."""

    def __init__(self, dim: int, rank: int, dtype: torch.dtype, device) -> None:
        self.stream, self.dtype = StreamingEigen(dim, rank, device=device), dtype

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> None:
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1])  # (N, d): (R, T, d) flattened row-major, token t of row r at r * T + t
        tokens = rows.shape[0] // (x.shape[0] if x.ndim == 3 else rows.shape[0])
        weight = torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device)
        if row_weight is not None:
            weight = row_weight.to(device=rows.device, dtype=torch.float64).repeat_interleave(tokens)
        if mask is not None:
            weight = weight * mask.reshape(-1).to(device=rows.device, dtype=torch.float64)
        keep = weight != 0
        self.stream.update(rows[keep], weight[keep])

    def all_reduce(self) -> None:
        """Every rank gathers every rank's U Λ^½ (same shapes everywhere) and re-decomposes their sum."""
        import torch.distributed as dist

        if rank_and_world()[1] == 1:
            return
        state = self.stream.state_dict()
        parts = {k: [torch.zeros_like(v) for _ in range(dist.get_world_size())] for k, v in state.items()}
        for key, value in state.items():
            dist.all_gather(parts[key], value)
        states = [{k: parts[k][r] for k in state} for r in range(dist.get_world_size())]
        self.stream = StreamingEigen.from_states(states)

    def result(self, scale: float = 1.0) -> EigenFactor:
        return self.stream.finalize(self.dtype).scaled(scale)

    @property
    def captured_mass(self) -> float:
        return self.stream.captured_mass


def make_factor(dim: int, dtype: torch.dtype, device, rank: int | None, threshold: int):
    """A ``StreamFactor`` when ``rank`` is set and ``dim`` exceeds ``threshold``, else a ``DenseFactor``."""
    if rank is not None and dim > threshold:
        return StreamFactor(dim, rank, dtype, device)
    return DenseFactor(dim, dtype, device)
