"""Curvature of a likelihood over the adapter sites: the backward vectors of each Fisher flavour and the
accumulation of K-FAC factors, diagonals or a dense matrix from the recorded activations and output gradients.

For outputs f with loss ``-log p(y | f)`` the curvature ``Σ_n J_nᵀ M_n J_n`` is a sum of outer products of
gradients ``J_nᵀ v`` for vectors v with ``Σ v vᵀ = M``:

- ``empirical``: one vector per example, ``∇_f (-log p(y | f)) = p - onehot(y)`` with the gold y;
- ``mc``: the same with y sampled from the model (``fisher_samples`` draws, weighted 1/S): an unbiased estimate of
  the GGN;
- ``exact`` (``choice`` only): the K columns ``√p_c (e_c - p)`` of a square root of ``diag(p) - p pᵀ``, the GGN of
  the categorical exactly.
"""

from __future__ import annotations

import torch

from peft_bayes.errors import InputError
from peft_bayes.posterior.curvature import (
    Recorder,
    Site,
    per_unit_gradients,
    rows_tokens,
)
from peft_bayes.posterior.distributed import all_reduce_sum_
from peft_bayes.posterior.kfac_stats import KronStats
from peft_bayes.posterior.likelihood import IGNORE, ChoiceBatch, LMBatch, lm_logits, row_scores, scores_matrix
from peft_bayes.posterior.structures import CurvatureBlock, DenseBlock, DiagBlock


def _gold(labels: torch.Tensor, what: str) -> torch.Tensor:
    if (labels < 0).any():
        raise InputError(f"the {what} likelihood needs the gold answer of every fit example")
    return labels


def _vectors(p: torch.Tensor, gold: torch.Tensor, fisher: str, samples: int, generator) -> list[tuple]:
    """(weight, vector) pairs over the last dimension of ``p`` (probabilities, 0 where a class does not exist)."""
    classes = p.shape[-1]
    if fisher == "empirical":
        return [(1.0, p - torch.nn.functional.one_hot(gold, classes).to(p.dtype))]
    if fisher == "mc":
        out = []
        for _ in range(samples):
            flat = p.reshape(-1, classes).detach().cpu().to(torch.float64)
            drawn = torch.multinomial(flat.clamp_min(0) + (flat.sum(-1, keepdim=True) == 0), 1, generator=generator)
            y = drawn.reshape(p.shape[:-1]).to(p.device)
            out.append((1.0 / samples, p - torch.nn.functional.one_hot(y, classes).to(p.dtype)))
        return out
    root = p.sqrt()
    eye = torch.eye(classes, dtype=p.dtype, device=p.device)
    return [(1.0, root[..., c : c + 1] * (eye[c] - p)) for c in range(classes)]


def backward_vectors(model, batch: ChoiceBatch | LMBatch, opts, generator):
    """Runs the forward pass of ``batch`` (sites recording) and returns
    ``(outputs, mask (R, T), unit (R,), n_units, nll, [(weight, vector)])``."""
    if isinstance(batch, ChoiceBatch):
        # The outputs are the (R,) row scores: option k of example n is row r alone, so a vector v over (B, K)
        # is the row vector v[example, option] (see CurvatureAccumulator.backward_rows).
        rows = row_scores(model, batch)
        f = scores_matrix(rows, batch)  # (B, K), -inf where an example has fewer options
        logp = f.detach().log_softmax(-1)
        p = logp.exp()
        gold = batch.labels.to(f.device)
        known = gold >= 0
        nll = -logp[known].gather(1, gold[known][:, None]).sum()
        if opts.fisher == "empirical":
            _gold(batch.labels, "empirical Fisher of the choice")
        vectors = _vectors(p, gold.clamp_min(0), opts.fisher, opts.fisher_samples, generator)
        example, option = batch.example.to(f.device), batch.option.to(f.device)
        row_vectors = [(w, v[example, option]) for w, v in vectors]
        return rows, batch.attention_mask, batch.example, batch.n_examples, nll, row_vectors
    logits = lm_logits(model, batch)[:, :-1]  # position t predicts labels[t + 1]
    labels = batch.labels.to(logits.device)[:, 1:]
    scored = labels != IGNORE
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    p = logp.detach().exp() * scored[..., None]
    nll = -(logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * scored).sum().detach()
    drawn = _vectors(p, labels.clamp_min(0), opts.fisher, opts.fisher_samples, generator)
    vectors = [(w, v * scored[..., None]) for w, v in drawn]
    rows = torch.arange(batch.n_examples)
    return logits, batch.attention_mask, rows, batch.n_examples, nll, vectors


class CurvatureAccumulator:
    """Sums of the curvature statistics of every site over the fit data, in ``dtype``."""

    def __init__(
        self,
        sites: list[Site],
        structure: str,
        reduce: bool,
        dtype: torch.dtype,
        rank: int | None = None,
        threshold: int = 2048,
    ) -> None:
        self.sites, self.structure, self.reduce, self.dtype = sites, structure, reduce, dtype
        device = sites[0].weight.device
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        if structure == "kron":  # K-FAC factors, dense or low-rank (kfac_stats.py)
            self.kron = KronStats(sites, reduce, dtype, rank, threshold)
        elif structure == "diag":
            self.D = [zeros(*s.shape) for s in sites]
        else:
            n = sum(s.weight.numel() for s in sites)
            self.H = zeros(n, n)

    def forward(self, rec: Recorder, mask: torch.Tensor, unit: torch.Tensor, n_units: int) -> None:
        """After a forward pass: the input factors (K-FAC)."""
        rec.check_recorded()
        if self.structure != "kron":
            return
        device = rec.inputs[0].device
        self.kron.forward(rec.inputs, mask.to(device), unit.to(device), n_units)

    def backward(self, rec: Recorder, outputs, vector, weight: float, mask, unit, n_units: int) -> None:
        """One backward vector: the output factors (K-FAC) or the per-example gradients (diag, full)."""
        grads = rec.output_grads(outputs, vector)
        rows = mask.shape[0]
        mask = mask.to(grads[0].device)
        if self.structure == "kron":
            for i, g in enumerate(grads):
                self.kron.backward(i, rows_tokens(g, rows), weight, unit.to(g.device), n_units)
            return
        per_unit = [
            per_unit_gradients(rows_tokens(a, rows), rows_tokens(g, rows), mask, unit, n_units, self.dtype)
            for a, g in zip(rec.inputs, grads)
        ]
        self._add_per_unit(weight, per_unit)

    def backward_rows(self, rec: Recorder, rows, vectors, mask, unit, n_units: int) -> None:
        """Every backward vector of a batch whose rows are independent (one option per row, ``vectors`` over the
        rows): ONE backward pass of the summed row scores gives each row's output gradients g_r, and a vector v
        scales them (v_r g_r), so every Fisher flavour costs one backward whatever the options or vectors."""
        grads = rec.output_grads(rows, torch.ones_like(rows))
        R, device = mask.shape[0], grads[0].device
        mask, unit = mask.to(device), unit.to(device)
        vs = [(w, v.to(device=device, dtype=self.dtype)) for w, v in vectors]
        if self.structure == "kron":
            for i, g in enumerate(grads):
                self.kron.backward_rows(i, rows_tokens(g, R), vs, unit, n_units)
            return
        gs = [rows_tokens(g, R).to(self.dtype) for g in grads]
        row_index = torch.arange(R, device=device)
        per_row = [
            per_unit_gradients(rows_tokens(a, R), g, mask, row_index, R, self.dtype) for a, g in zip(rec.inputs, gs)
        ]
        for w, v in vs:
            per_unit = [
                j.new_zeros((n_units, *j.shape[1:])).index_add_(0, unit, v[:, None, None] * j) for j in per_row
            ]
            self._add_per_unit(w, per_unit)

    def _add_per_unit(self, weight: float, per_unit: list[torch.Tensor]) -> None:
        """Per-unit gradients (n_units, out, in) of every site for one vector: squared (diag) or outer (full)."""
        if self.structure == "diag":
            for i, j in enumerate(per_unit):
                self.D[i] += weight * j.pow(2).sum(0)
            return
        flat = torch.cat([j.flatten(1) for j in per_unit], 1)  # (units, P)
        self.H += weight * flat.T @ flat

    def all_reduce(self) -> None:
        """Sums the statistics over the ranks of ``torchrun`` (no-op in one process)."""

        if self.structure == "kron":
            self.kron.all_reduce()
        else:
            all_reduce_sum_(self.D if self.structure == "diag" else [self.H])

    def blocks(self) -> list[CurvatureBlock]:
        if self.structure == "kron":
            return self.kron.blocks()
        if self.structure == "diag":
            return [DiagBlock(d) for d in self.D]
        return [DenseBlock(self.H)]
