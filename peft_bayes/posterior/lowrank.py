"""Low-rank Kronecker factors: K-FAC factors kept as their top-k eigenpairs plus one scalar for the rest.

At LLaMA-7B scale a full K-FAC factor of a 4096-wide weight side is 4096 × 4096 (64 MiB in float32), and LoRA on q / v
has 128 of them: 8 GiB. A factor above a size threshold is kept instead as

    F ≈ U diag(λ) Uᵀ + ρ (I - U Uᵀ)        U (d, k) orthonormal, λ (k,) descending, ρ >= 0

with ρ the mean of the discarded spectrum, so the approximation keeps F's trace. :class:`StreamingEigen` builds it
from the batches of inputs (or output gradients) without ever forming the d × d factor: it keeps the top
``rank + oversample`` eigenpairs of the running sum and folds each batch in by an incremental SVD.
:class:`EigenFactor` is the result and :class:`LowRankKronBlock` the curvature block H ≈ G ⊗ A over two of them,
with the interface of :class:`~peft_bayes.posterior.structures.KronBlock`.

In the eigenbases of the factors, an (out, in) matrix M splits into four orthogonal parts — (span of U_g / its
complement) × (span of U_a / its complement) — on which H is a scalar per entry: λg_i λa_j, λg_i ρa, ρg λa_j and
ρg ρa. Every method of the block applies a function of the precision eigenvalues part by part, so the complements
never need a basis and neither a dense d × d factor nor the (out·in)² block is formed (except in ``to_dense``, for
tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_bayes.posterior.structures import CurvatureBlock, Delta

# Sizes of the LLaMA-7B projections LoRA targets: name -> (out, in) of the frozen Linear.
_LLAMA7B_HIDDEN, _LLAMA7B_FFN, _LLAMA7B_LAYERS = 4096, 11008, 32
_LLAMA7B_LINEARS = {
    **{name: (_LLAMA7B_HIDDEN, _LLAMA7B_HIDDEN) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gate_proj": (_LLAMA7B_FFN, _LLAMA7B_HIDDEN),
    "up_proj": (_LLAMA7B_FFN, _LLAMA7B_HIDDEN),
    "down_proj": (_LLAMA7B_HIDDEN, _LLAMA7B_FFN),
}


class EigenFactor:
    """A symmetric PSD factor F ≈ U diag(λ) Uᵀ + ρ (I - U Uᵀ) of size dim × dim.

    With k == dim it is an exact full factor (F = U diag(λ) Uᵀ) and ρ is unused.

    Args:
        U (`torch.Tensor` of shape (dim, k)): orthonormal columns, the kept eigenvectors (k <= dim, k may be 0).
        lam (`torch.Tensor` of shape (k,)): their eigenvalues, >= 0.
        rho (`float` or 0-dim `torch.Tensor`, defaults to 0.0): the eigenvalue of the complement of U's span.
        dim (`int`, *optional*): the factor's size, checked against ``U.shape[0]``.
    """

    def __init__(self, U: torch.Tensor, lam: torch.Tensor, rho: float | torch.Tensor = 0.0, dim: int | None = None):
        if U.ndim != 2 or U.shape[0] == 0 or U.shape[1] > U.shape[0]:
            raise ValueError(f"U must have shape (dim, k) with 0 <= k <= dim and dim > 0, got {tuple(U.shape)}")
        if dim is not None and dim != U.shape[0]:
            raise ValueError(f"dim={dim} does not match U's {U.shape[0]} rows")
        if lam.shape != (U.shape[1],):
            raise ValueError(f"lam must have shape ({U.shape[1]},) to match U's columns, got {tuple(lam.shape)}")
        self.U, self.lam = U, lam.to(dtype=U.dtype, device=U.device)
        self.rho = torch.as_tensor(rho, dtype=U.dtype, device=U.device).reshape(())

    @classmethod
    def from_dense(cls, F: torch.Tensor, rank: int | None = None) -> EigenFactor:
        """The top-``rank`` eigenpairs of a dense symmetric PSD ``F`` and the mean of the rest (its whole spectrum,
        exactly, when ``rank`` is None or >= dim). Eigenvalues are computed in float64 and clamped at 0."""
        if F.ndim != 2 or F.shape[0] != F.shape[1] or F.shape[0] == 0:
            raise ValueError(f"F must be a non-empty square matrix, got shape {tuple(F.shape)}")
        lam, U = torch.linalg.eigh(F.to(torch.float64))
        lam, U = lam.clamp(min=0).flip(0), U.flip(1)  # descending
        return _truncate(U, lam, lam.sum(), F.shape[0] if rank is None else rank).to(dtype=F.dtype)

    # ---- sizes and spectrum ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.U.shape[0]

    @property
    def k(self) -> int:
        """Number of kept eigenpairs."""
        return self.U.shape[1]

    @property
    def is_full(self) -> bool:
        return self.k == self.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def shift(self) -> torch.Tensor:
        """The scalar s of F = U diag(λ - s) Uᵀ + s I: ρ, or 0 for a full factor (whose ρ is unused)."""
        return self.rho.new_zeros(()) if self.is_full else self.rho

    @property
    def trace(self) -> torch.Tensor:
        return self.lam.sum() + (self.dim - self.k) * self.shift

    @property
    def captured_mass(self) -> float:
        """Σλ / trace: the share of the trace the kept eigenpairs carry (1.0 for a zero factor)."""
        trace = float(self.trace)
        return float(self.lam.sum()) / trace if trace > 0 else 1.0

    @property
    def numel_stored(self) -> int:
        """Numbers stored: U, λ and ρ."""
        return self.U.numel() + self.lam.numel() + 1

    # ---- algebra -----------------------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense (dim, dim) factor (for tests)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return (self.U * (self.lam - self.shift)) @ self.U.mT + self.shift * eye

    def matmul(self, m: torch.Tensor, axis: int = -2) -> torch.Tensor:
        """F applied along ``axis`` of m (which must have size dim there): ``F @ m`` for the default axis -2, and
        ``m @ F`` (F is symmetric) for axis -1."""
        if m.ndim == 0 or m.shape[axis] != self.dim:
            raise ValueError(f"m must have size {self.dim} along axis {axis}, got shape {tuple(m.shape)}")
        x = m.movedim(axis, -1)  # (..., dim)
        coef = x @ self.U  # (..., k)
        out = (coef * (self.lam - self.shift)) @ self.U.mT + self.shift * x
        return out.movedim(-1, axis)

    def scaled(self, c: float) -> EigenFactor:
        """c F for c >= 0 (same eigenvectors)."""
        if c < 0:
            raise ValueError(f"a PSD factor can only be scaled by c >= 0, got {c}")
        return EigenFactor(self.U, c * self.lam, c * self.rho)

    def add(self, other: EigenFactor, rank: int | None = None) -> EigenFactor:
        """F + F' kept at ``rank`` (default: the larger of the two ranks) eigenpairs plus the mean of the rest.

        F + F' = W diag(λ - s, λ' - s') Wᵀ + (s + s') I with W = [U, U']: a thin QR of W and a small symmetric
        eigendecomposition give the sum's eigenpairs in span(W); the top ``rank`` of them are kept and the rest,
        with the complement of span(W), are replaced by their mean, so the trace is kept. Exact when the result is
        full (e.g. when either factor is full).
        """
        if other.dim != self.dim:
            raise ValueError(f"cannot add factors of sizes {self.dim} and {other.dim}")
        rank = max(self.k, other.k) if rank is None else rank
        W = torch.cat([self.U, other.U.to(self.U)], 1).to(torch.float64)  # (dim, k + k')
        D = torch.cat([self.lam - self.shift, (other.lam - other.shift).to(self.lam)]).to(torch.float64)
        shift = (self.shift + other.shift.to(self.shift)).to(torch.float64)
        Q, R = torch.linalg.qr(W)  # (dim, r), (r, k + k')
        mu, V = torch.linalg.eigh((R * D) @ R.mT)
        lam, U = (mu + shift).clamp(min=0).flip(0), (Q @ V).flip(1)
        trace = self.trace.to(torch.float64) + other.trace.to(torch.float64)
        return _truncate(U, lam, trace, rank).to(dtype=self.dtype)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> EigenFactor:
        return EigenFactor(
            self.U.to(dtype=dtype, device=device),
            self.lam.to(dtype=dtype, device=device),
            self.rho.to(dtype=dtype, device=device),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "lam": self.lam, "rho": self.rho}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> EigenFactor:
        missing = [key for key in ("U", "lam", "rho") if key not in state]
        if missing:
            raise KeyError(f"EigenFactor state dict lacks {missing}; expected keys ['U', 'lam', 'rho']")
        return cls(state["U"], state["lam"], state["rho"])

    def __repr__(self) -> str:
        return f"EigenFactor(dim={self.dim}, k={self.k}, dtype={self.dtype}, device={self.device})"


def _truncate(U: torch.Tensor, lam: torch.Tensor, trace: torch.Tensor, rank: int) -> EigenFactor:
    """The top ``rank`` of descending eigenpairs (U, lam) and ρ = (trace - Σ kept) / (dim - k), clamped at 0."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dim = U.shape[0]
    k = min(rank, lam.shape[0])
    U, lam = U[:, :k], lam[:k]
    rho = ((trace - lam.sum()) / (dim - k)).clamp(min=0) if k < dim else lam.new_zeros(())
    return EigenFactor(U, lam, rho)


class StreamingEigen:
    """F = Σ_batches Xᵀ diag(w) X accumulated as a truncated eigendecomposition: the d × d sum never exists.

    The state is the top ``width = min(dim, rank + oversample)`` eigenpairs (U, λ) of the running sum and its exact
    trace Σ w ‖x‖². A batch is folded in by an incremental SVD: the eigenpairs of U Λ Uᵀ + Bᵀ B with B = w^½ X are
    the left singular pairs of C = [U Λ^½, Bᵀ] (d, width + n), from a thin QR C = Q R and the SVD of the small R.
    Columns beyond ``width`` are dropped after each step; the ``oversample`` extra columns keep that truncation
    error away from the top ``rank`` (exact while the sum's rank stays <= width). All arithmetic is float64.

    Merging across processes needs no all-reduce of a d × d matrix: every rank gathers the others' ``state_dict()``
    (``root`` = U Λ^½, (dim, width), and ``trace``, of the same shapes on every rank) e.g. with
    ``torch.distributed.all_gather_into_tensor``, and re-decomposes them with :meth:`from_states` (the same
    incremental update on the concatenated roots).

    Args:
        dim (`int`): size d of the factor (the feature dimension of X).
        rank (`int`): eigenpairs kept by :meth:`finalize`.
        oversample (`int`, defaults to 10): extra columns carried while streaming.
        chunk_size (`int`, defaults to 1024): rows of X folded in per QR (bounds the (d, width + chunk) workspace).
        device (`torch.device` or `str`, defaults to "cpu"): where the state lives; batches are moved there.
    """

    def __init__(self, dim: int, rank: int, oversample: int = 10, chunk_size: int = 1024, device="cpu") -> None:
        if dim < 1 or rank < 1 or oversample < 0 or chunk_size < 1:
            raise ValueError(
                f"need dim >= 1, rank >= 1, oversample >= 0, chunk_size >= 1; got {dim}, {rank}, {oversample}, "
                f"{chunk_size}"
            )
        self.dim, self.rank, self.oversample, self.chunk_size = dim, rank, oversample, chunk_size
        self.width = min(dim, rank + oversample)
        self.U = torch.zeros(dim, 0, dtype=torch.float64, device=device)
        self.lam = torch.zeros(0, dtype=torch.float64, device=device)
        self.trace = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.U.device

    def update(self, X: torch.Tensor, weight: torch.Tensor | None = None) -> StreamingEigen:
        """Adds Xᵀ diag(weight) X. Returns ``self``.

        Args:
            X (`torch.Tensor` of shape (n, dim)): rows (inputs or output gradients), any float dtype.
            weight (`torch.Tensor` of shape (n,), *optional*): non-negative row weights, 1 when omitted.
        """
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"X must have shape (n, {self.dim}), got {tuple(X.shape)}")
        X = X.to(device=self.device, dtype=torch.float64)
        if weight is not None:
            if weight.shape != (X.shape[0],):
                raise ValueError(
                    f"weight must have shape ({X.shape[0]},) to match X's rows, got {tuple(weight.shape)}"
                )
            weight = weight.to(device=self.device, dtype=torch.float64)
            if bool((weight < 0).any()):
                raise ValueError("weight must be non-negative (rows enter as w^(1/2) x)")
            X = X * weight.sqrt()[:, None]
        self.trace = self.trace + X.pow(2).sum()
        self._absorb(X.mT)
        return self

    def _absorb(self, B: torch.Tensor) -> None:
        """Folds the columns of B (dim, c) into the eigenpairs: U Λ Uᵀ <- top-width of U Λ Uᵀ + B Bᵀ.

        Where the batch is wide against the factor (dim <= held + chunk columns: a factor of a few hundred features
        and thousands of tokens), the same sum is formed as the (dim, dim) Gram U Λ Uᵀ + B Bᵀ and eigendecomposed
        once, d²(held + c) + d³ instead of the QR's d (held + c)² per chunk (no larger than the QR's workspace);
        otherwise (wide factors: the case the stream exists for) by the chunked QR / SVD.
        """
        if self.dim <= self.U.shape[1] + min(B.shape[1], self.chunk_size):
            G = (self.U * self.lam) @ self.U.mT
            for chunk in B.split(self.chunk_size, dim=1):
                G.addmm_(chunk, chunk.mT)
            lam, U = torch.linalg.eigh((G + G.mT) / 2)  # ascending
            lam, U = lam.flip(0)[: self.width].clamp(min=0), U.flip(1)[:, : self.width]
            self.U, self.lam = U, lam
            return
        for chunk in B.split(self.chunk_size, dim=1):
            C = torch.cat([self.U * self.lam.sqrt(), chunk], 1)  # (dim, m + c)
            Q, R = torch.linalg.qr(C)  # (dim, r), (r, m + c), r = min(dim, m + c)
            Ur, s, _ = torch.linalg.svd(R, full_matrices=False)  # descending singular values
            self.U, self.lam = Q @ Ur[:, : self.width], s[: self.width].pow(2)

    @property
    def captured_mass(self) -> float:
        """Share of the trace carried by the top ``rank`` eigenvalues (1.0 while nothing was added)."""
        trace = float(self.trace)
        return float(self.lam[: self.rank].sum()) / trace if trace > 0 else 1.0

    def finalize(self, dtype: torch.dtype = torch.float64) -> EigenFactor:
        """The top ``rank`` eigenpairs and ρ = (trace - Σλ) / (dim - k), the mean of the discarded spectrum.

        k = min(rank, eigenpairs held): fewer than ``rank`` while fewer rows than that were added (ρ then ~0).
        """
        return _truncate(self.U, self.lam, self.trace, self.rank).to(dtype=dtype)

    # ---- merging -----------------------------------------------------------------------------------------------
    def add_(self, other: StreamingEigen) -> StreamingEigen:
        """Folds another stream (e.g. another process's) into this one: the sum of the two factors, by the same
        incremental update on ``other``'s U Λ^½. Exact while the summed rank stays <= width. Returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge streams of dims {other.dim} and {self.dim}")
        self._absorb((other.U * other.lam.sqrt()).to(self.device))
        self.trace = self.trace + other.trace.to(self.device)
        return self

    def merge(self, other: StreamingEigen) -> StreamingEigen:
        """A new stream holding the sum of this one and ``other`` (neither is modified)."""
        return StreamingEigen.from_state_dict(self.state_dict(), chunk_size=self.chunk_size).add_(other)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``root`` = U Λ^½ zero-padded to (dim, width) columns (the same shape on every process, so it can be
        gathered; zero columns add nothing), ``trace`` (0-dim), and ``rank`` / ``oversample`` as 0-dim int64."""
        root = self.U * self.lam.sqrt()
        root = torch.nn.functional.pad(root, (0, self.width - root.shape[1]))
        return {
            "root": root,
            "trace": self.trace.clone(),
            "rank": torch.tensor(self.rank),
            "oversample": torch.tensor(self.oversample),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], chunk_size: int = 1024) -> StreamingEigen:
        return cls.from_states([state], chunk_size=chunk_size)

    @classmethod
    def from_states(cls, states: Sequence[dict[str, torch.Tensor]], chunk_size: int = 1024) -> StreamingEigen:
        """One stream holding the sum of several ``state_dict()`` outputs (e.g. gathered from every process)."""
        if not states:
            raise ValueError("from_states needs at least one state dict")
        missing = [key for key in ("root", "trace", "rank", "oversample") if key not in states[0]]
        if missing:
            raise KeyError(f"StreamingEigen state dict lacks {missing}")
        first = states[0]
        out = cls(
            first["root"].shape[0],
            int(first["rank"]),
            int(first["oversample"]),
            chunk_size,
            device=first["root"].device,
        )
        for state in states:
            if state["root"].shape[0] != out.dim:
                raise ValueError(f"cannot merge streams of dims {state['root'].shape[0]} and {out.dim}")
            out._absorb(state["root"].to(device=out.device, dtype=torch.float64))
            out.trace = out.trace + state["trace"].to(device=out.device, dtype=torch.float64)
        return out

    def __repr__(self) -> str:
        return (
            f"StreamingEigen(dim={self.dim}, rank={self.rank}, oversample={self.oversample}, held={self.U.shape[1]})"
        )


def _check_prior(delta: Delta, scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale}")
    if not isinstance(delta, torch.Tensor) and delta < 0:
        raise ValueError(f"delta (the prior precision) must be >= 0, got {delta}")


class LowRankKronBlock(CurvatureBlock):
    """H ≈ G ⊗ A for a weight of shape (out, in), flattened row-major, with G and A low-rank-plus-scalar factors.

    Either factor may be full (k == dim); with both full this is :class:`~peft_bayes.posterior.structures.KronBlock`
    of the same factors. The complements of U_g's and U_a's spans have no stored basis, so the eigenbasis rotation
    hooks of the base class are not available; ``logdet``, ``inv_mv``, ``inv_quad`` and ``sample`` act part by part
    (see the module docstring) and ``mv`` uses the factors.

    Args:
        G (`EigenFactor` of size out): output-gradient factor.
        A (`EigenFactor` of size in): input-activation factor.
    """

    kind = "kron_lowrank"
    _factor_names = ("G", "A")

    def __init__(self, G: EigenFactor, A: EigenFactor) -> None:
        if not isinstance(G, EigenFactor) or not isinstance(A, EigenFactor):
            raise TypeError(f"G and A must be EigenFactor, got {type(G).__name__} and {type(A).__name__}")
        if G.dtype != A.dtype or G.device != A.device:
            raise ValueError(f"G and A must share dtype and device, got {G.dtype}/{G.device} and {A.dtype}/{A.device}")
        self.G, self.A = G, A

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.G.dim, self.A.dim))

    def eigenvalues(self) -> torch.Tensor:
        """The (out, in) spectrum of H: rows are G's eigenvalues (λg, then ρg for the out - kg complement
        directions), columns A's; the complements have no explicit eigenvectors."""
        lg = torch.cat([self.G.lam, self.G.shift.expand(self.G.dim - self.G.k)])
        la = torch.cat([self.A.lam, self.A.shift.expand(self.A.dim - self.A.k)])
        return lg[:, None] * la[None, :]

    def _rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LowRankKronBlock has no basis of the factors' complements; it acts part by part")

    _rotate_out = _rotate_in

    def _h_mv(self, m: torch.Tensor) -> torch.Tensor:
        return self.A.matmul(self.G.matmul(m, axis=-2), axis=-1)  # G M A

    def _parts(self, delta: Delta, scale: float) -> tuple[torch.Tensor, ...]:
        """Precision eigenvalues of the four parts: (kg, ka), (kg,) × ρa, ρg × (ka,), ρg ρa (0-dim)."""
        _check_prior(delta, scale)
        lg, la, rg, ra = self.G.lam, self.A.lam, self.G.shift, self.A.shift
        return (
            scale * lg[:, None] * la[None, :] + delta,
            scale * lg * ra + delta,
            scale * rg * la + delta,
            scale * rg * ra + delta,
        )

    def _apply(self, m: torch.Tensor, power: float, delta: Delta, scale: float) -> torch.Tensor:
        """P^power m for m (..., out, in): each of the four parts of m times its precision eigenvalue ** power.

        Parts whose complement is empty (a full factor) are skipped, so a zero eigenvalue there cannot give 0 / 0.
        """
        p11, p12, p21, p22 = self._parts(delta, scale)
        Ug, Ua = self.G.U, self.A.U
        cg, ca = self.G.dim - self.G.k, self.A.dim - self.A.k
        mg = Ug.mT @ m  # (..., kg, in): U_g-span rows
        m11 = mg @ Ua  # (..., kg, ka)
        out = Ug @ (m11 * p11.pow(power)) @ Ua.mT
        if ca:
            out = out + Ug @ ((mg - m11 @ Ua.mT) * p12.pow(power)[:, None])  # M_12: U_g-span × A-complement
        if cg:
            m_perp = m - Ug @ mg  # (..., out, in): G-complement rows
            m21 = m_perp @ Ua  # (..., out, ka)
            out = out + (m21 * p21.pow(power)) @ Ua.mT
            if ca:
                out = out + p22.pow(power) * (m_perp - m21 @ Ua.mT)
        return out

    def logdet(self, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """log det(scale * H + delta * I) in closed form: Σ_ij log p_ij + (in - ka) Σ_i log(s λg_i ρa + δ)
        + (out - kg) Σ_j log(s ρg λa_j + δ) + (out - kg)(in - ka) log(s ρg ρa + δ); differentiable in ``delta``."""
        p11, p12, p21, p22 = self._parts(delta, scale)
        cg, ca = self.G.dim - self.G.k, self.A.dim - self.A.k
        out = p11.log().sum()
        if ca:
            out = out + ca * p12.log().sum()
        if cg:
            out = out + cg * p21.log().sum()
        if cg and ca:
            out = out + cg * ca * p22.log()
        return out

    def inv_mv(self, m: torch.Tensor, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """P⁻¹ m for m of shape (out, in) or a batch (..., out, in); same shape back."""
        self._check_trailing("m", m)
        return self._apply(m, -1.0, delta, scale)

    def inv_quad(self, jac: torch.Tensor, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """J P⁻¹ Jᵀ for jac (..., K, out, in) -> (..., K, K), from the symmetrically whitened rows P^(-1/2) J."""
        self._check_trailing("jac", jac, lead=1)
        white = self._apply(jac, -0.5, delta, scale).flatten(-2)  # (..., K, out * in)
        return white @ white.mT

    def sample(
        self, delta: Delta, scale: float = 1.0, n: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws from N(0, P⁻¹) as P^(-1/2) z, z standard normal (drawn on CPU as in the base class)."""
        size = tuple(self.shape) if n is None else (n, *self.shape)
        noise_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        z = torch.randn(size, generator=generator, dtype=noise_dtype, device="cpu")
        return self._apply(z.to(device=self.device, dtype=self.dtype), -0.5, delta, scale)

    def to_dense(self) -> torch.Tensor:
        return torch.kron(self.G.to_dense(), self.A.to_dense())

    def scaled(self, c: float) -> LowRankKronBlock:
        """c (G ⊗ A) = (c G) ⊗ A, for c >= 0."""
        return LowRankKronBlock(self.G.scaled(c), self.A)

    def add_(self, other: CurvatureBlock) -> LowRankKronBlock:
        """(G + G') ⊗ (A + A') as K-FAC sums statistics, each factor sum kept at the larger of the two ranks plus
        the mean of the rest (:meth:`EigenFactor.add`; exact for full factors). Returns ``self``."""
        if not isinstance(other, LowRankKronBlock):
            raise TypeError(f"cannot add a {type(other).__name__} to a {type(self).__name__}")
        if tuple(other.shape) != tuple(self.shape):
            raise ValueError(f"cannot add blocks of shapes {tuple(other.shape)} and {tuple(self.shape)}")
        self.G, self.A = self.G.add(other.G), self.A.add(other.A)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value for name in ("G", "A") for key, value in getattr(self, name).state_dict().items()
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LowRankKronBlock:
        expected = [f"{name}.{key}" for name in ("G", "A") for key in ("U", "lam", "rho")]
        missing = [key for key in expected if key not in state]
        if missing:
            raise KeyError(f"LowRankKronBlock state dict lacks {missing}; expected keys {expected}")
        G, A = ({key: state[f"{name}.{key}"] for key in ("U", "lam", "rho")} for name in ("G", "A"))
        return cls(EigenFactor.from_state_dict(G), EigenFactor.from_state_dict(A))

    def __repr__(self) -> str:
        return f"LowRankKronBlock(shape={tuple(self.shape)}, ranks=({self.G.k}, {self.A.k}), dtype={self.dtype})"


# ---- memory ----------------------------------------------------------------------------------------------------
def _factor_numel(dim: int, rank: int | None) -> int:
    """Numbers stored for one factor: dim² when full (rank None or >= dim), else U, λ and ρ."""
    if rank is None or rank >= dim:
        return dim * dim
    return dim * rank + rank + 1


def factor_memory(shapes: Sequence[tuple[int, int]], rank: int | None = None, dtype_bytes: int = 4) -> int:
    """Bytes stored for the K-FAC factors of weights of the given (out, in) shapes: G (out × out) and A (in × in)
    per weight, dense when ``rank`` is None, else factors wider than ``rank`` as rank-``rank`` EigenFactors (U, λ, ρ)
    and the others dense."""
    return dtype_bytes * sum(_factor_numel(out, rank) + _factor_numel(inp, rank) for out, inp in shapes)


def llama7b_lora_shapes(r: int = 8, targets: Sequence[str] = ("q_proj", "v_proj")) -> list[tuple[int, int]]:
    """Shapes (out, in) of the LoRA adapter weights on LLaMA-7B: per layer (32) and target, lora_A (r, in) and
    lora_B (out, r). On q / v: 128 weights, whose 4096-wide factors are A of lora_A and G of lora_B."""
    unknown = [t for t in targets if t not in _LLAMA7B_LINEARS]
    if unknown:
        raise ValueError(f"unknown LLaMA-7B targets {unknown}; known: {sorted(_LLAMA7B_LINEARS)}")
    shapes = []
    for _ in range(_LLAMA7B_LAYERS):
        for target in targets:
            out, inp = _LLAMA7B_LINEARS[target]
            shapes += [(r, inp), (out, r)]
    return shapes


__all__ = ["EigenFactor", "LowRankKronBlock", "StreamingEigen", "factor_memory", "llama7b_lora_shapes"]
