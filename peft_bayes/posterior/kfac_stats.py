"""K-FAC statistics of every adapter weight: the input factors A (from the recorded activations, once per forward)
and the output factors G (from the output gradients of each backward vector), ``expand`` or ``reduce`` over the
tokens (Eschenhagen et al. 2023), as dense or streamed low-rank sums (``factors.py``).

expand: A = Σ_{tokens} a aᵀ / (number of tokens), G = Σ_{tokens} g gᵀ;
reduce: A = Σ_units ā ā ᵀ / (number of units) with ā a unit's token mean, G = Σ_units ĝ ĝᵀ with ĝ its token sum.
Sites that read the same input tensor (LoRA A of q, k and v) share one A, accumulated once.
"""

from __future__ import annotations

import torch

from peft_bayes.kernels.kfac import masked_row_sums
from peft_bayes.posterior.distributed import sum_scalars
from peft_bayes.posterior.factors import DenseFactor, make_factor
from peft_bayes.posterior.lowrank import EigenFactor, LowRankKronBlock
from peft_bayes.posterior.structures import CurvatureBlock, KronBlock


def _unit_sums(rows: torch.Tensor, unit: torch.Tensor, n_units: int, row_weight=None) -> torch.Tensor:
    """(n_units, d): Σ over each unit's rows of ``row_weight * rows``."""
    if row_weight is not None:
        rows = rows * row_weight[:, None].to(rows.dtype)
    return rows.new_zeros((n_units, rows.shape[-1])).index_add_(0, unit.to(rows.device), rows)


class KronStats:
    """The running K-FAC factors of ``sites``; ``rank`` / ``threshold``: factors wider than ``threshold`` are
    kept as top-``rank`` eigenpairs + one scalar (None: all dense)."""

    def __init__(self, sites, reduce: bool, dtype: torch.dtype, rank: int | None = None, threshold: int = 2048):
        self.sites, self.reduce, self.dtype, self.rank, self.threshold = sites, reduce, dtype, rank, threshold
        self.device = sites[0].weight.device
        self.G = [make_factor(s.shape[0], dtype, self.device, rank, threshold) for s in sites]
        self.A: list | None = None  # built at the first forward, when the shared inputs are known
        self.count = 0.0

    def _share_inputs(self, inputs: list[torch.Tensor]) -> None:
        first: dict[tuple, int] = {}
        self.A, self.leaders = [], []
        for i, a in enumerate(inputs):
            key = (a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype)
            if key in first:
                self.A.append(self.A[first[key]])
            else:
                first[key] = i
                self.leaders.append(i)
                self.A.append(make_factor(self.sites[i].shape[1], self.dtype, self.device, self.rank, self.threshold))

    def forward(self, inputs: list[torch.Tensor], mask: torch.Tensor, unit: torch.Tensor, n_units: int) -> None:
        """The input factors of one forward pass; ``inputs`` (R, T, in) per site, ``mask`` (R, T)."""
        if self.A is None:
            self._share_inputs(inputs)
        R = mask.shape[0]
        for i in self.leaders:
            a = inputs[i].reshape(R, -1, inputs[i].shape[-1])
            if not self.reduce:
                self.A[i].add(a, mask)
                continue
            sums = _unit_sums(masked_row_sums(a, mask).to(self.dtype), unit, n_units)
            counts = _unit_sums(mask.sum(1, keepdim=True).to(sums), unit, n_units).clamp_min(1)
            self.A[i].add(sums / counts)
        self.count += float(mask.sum()) if not self.reduce else float(n_units)

    def backward_rows(self, i: int, g: torch.Tensor, vectors, unit: torch.Tensor, n_units: int) -> None:
        """Site ``i``'s output factor from one backward of the summed rows: g (R, T, out), ``vectors`` [(w, v_r)]
        over rows; the output gradients of vector v are v_r g_r."""
        if not self.reduce:
            w_r = sum(w * v.pow(2) for w, v in vectors)  # (R,) ≥ 0: Σ_v w (v_r g)(v_r g)ᵀ = w_r g gᵀ
            self.G[i].add(g, row_weight=w_r)
            return
        sums = masked_row_sums(g).to(self.dtype)  # (R, out)
        for w, v in vectors:
            u = _unit_sums(sums, unit, n_units, v)
            self.G[i].add(u, row_weight=torch.full((n_units,), float(w), dtype=self.dtype, device=u.device))

    def backward(self, i: int, g: torch.Tensor, weight: float, unit: torch.Tensor, n_units: int) -> None:
        """Site ``i``'s output factor for one backward vector's gradients g (R, T, out)."""
        if not self.reduce:
            self.G[i].add(g, row_weight=torch.full((g.shape[0],), float(weight), dtype=self.dtype, device=g.device))
            return
        u = _unit_sums(masked_row_sums(g).to(self.dtype), unit, n_units)
        self.G[i].add(u, row_weight=torch.full((n_units,), float(weight), dtype=self.dtype, device=u.device))

    def _factors(self) -> list:
        unique = {id(f): f for f in (*(self.A or []), *self.G)}
        return list(unique.values())

    def all_reduce(self) -> None:
        for factor in self._factors():
            factor.all_reduce()
        (self.count,) = sum_scalars([self.count])

    def captured_mass(self) -> list[float]:
        """Per site, the smaller captured eigenvalue mass of its two factors (1.0 for dense factors)."""
        if self.A is None:
            return [1.0] * len(self.sites)
        return [min(a.captured_mass, g.captured_mass) for a, g in zip(self.A, self.G)]

    def blocks(self) -> list[CurvatureBlock]:
        if self.A is None:
            raise RuntimeError("no forward pass was recorded")
        scale = 1.0 / max(self.count, 1.0)
        results = {id(a): a.result(scale) for a in self.A}
        out = []
        for a, g in zip(self.A, self.G):
            A, G = results[id(a)], g.result()
            if isinstance(a, DenseFactor) and isinstance(g, DenseFactor):
                out.append(KronBlock(G, A))
            else:
                as_eigen = lambda f: f if isinstance(f, EigenFactor) else EigenFactor.from_dense(f)  # noqa: E731
                out.append(LowRankKronBlock(as_eigen(G), as_eigen(A)))
        return out
