"""Structured curvature blocks of a Laplace posterior over adapter weights: Kronecker, diagonal and dense.

A block covers the parameters of one weight (or, for the ``full`` structure, all parameters at once) and holds the
curvature H of the log likelihood over them. The posterior precision of the block is

    P = scale * H + delta * I

with ``scale`` a positive float (a likelihood temperature or data multiplier) and ``delta`` the prior precision, a
float or a 0-dim tensor that may require grad: ``logdet``, ``inv_mv``, ``inv_quad`` and ``sample`` are
differentiable in ``delta``, so the marginal likelihood can be optimised over it by autograd.

Conventions: a weight W has shape (out, in) and is flattened row-major (``W.flatten()``). Its K-FAC block is
H = G ⊗ A with G (out, out) the sum of output-gradient outer products and A (in, in) the sum of input-activation
outer products; with row-major flattening the dense block is ``torch.kron(G, A)`` and it acts on an (out, in)
matrix M as ``G @ M @ A``. Its eigenvalues are lg_i * la_j, with eigenvectors qg_i ⊗ qa_j, so everything below works
in the factors' eigenbases and never forms the (n, n) Kronecker product (except in ``to_dense``, for tests).

Every block exposes its eigenvalues in the layout of its parameters (``shape``) together with a rotation into and
out of its eigenbasis; the base class builds log-determinants, solves, GLM quadratic forms and samples from these.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

Delta = float | torch.Tensor


def _eigh_clamped(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD ``matrix`` computed in float64, eigenvalues clamped at 0, in ``matrix.dtype``.

    float64 because K-FAC factors sum many outer products and their small eigenvalues are the ones that matter for
    the log-determinant; the clamp removes the slightly negative eigenvalues that round-off leaves in PSD matrices.
    """
    eigvals, eigvecs = torch.linalg.eigh(matrix.to(torch.float64))
    return eigvals.clamp(min=0).to(matrix.dtype), eigvecs.to(matrix.dtype)


def _check_square(name: str, matrix: torch.Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(matrix.shape)}")


class CurvatureBlock(ABC):
    """Base of the structured curvature blocks: the precision P = scale * H + delta * I of one parameter block.

    Subclasses provide the eigenvalues of H (laid out like the parameters), the rotation into and out of the
    eigenbasis, and the product with H; the base class derives the rest.

    Attributes:
        kind (`str`): the structure's name, ``"kron"``, ``"diag"`` or ``"full"``.
    """

    kind: ClassVar[str]
    _factor_names: ClassVar[tuple[str, ...]]
    _eig: tuple[torch.Tensor, ...] | None = None  # cached eigenpairs, where the structure needs them

    # ---- hooks -------------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def shape(self) -> torch.Size:
        """Shape of the parameters the block covers: (out, in) for Kron / Diag, (n,) for Dense."""

    @abstractmethod
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of H (clamped at 0 where computed by an eigendecomposition), a tensor of shape ``shape``."""

    @abstractmethod
    def _rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        """Coordinates of m (..., *shape) in the eigenbasis of H, same shape."""

    @abstractmethod
    def _rotate_out(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_rotate_in``: eigenbasis coordinates (..., *shape) back to parameter layout."""

    @abstractmethod
    def _h_mv(self, m: torch.Tensor) -> torch.Tensor:
        """H m for m of shape (..., *shape)."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The dense H of shape (numel, numel) over the row-major flattened parameters (for tests only)."""

    @abstractmethod
    def scaled(self, c: float) -> CurvatureBlock:
        """A new block whose H is ``c`` times this one's (the factors are not modified)."""

    def eigendecompose(self) -> CurvatureBlock:
        """Compute and cache the eigendecomposition of H (a no-op where H is diagonal). Returns ``self``."""
        return self

    def _invalidate(self) -> None:
        """Forget cached eigenpairs after the factors changed."""
        self._eig = None

    # ---- shared pieces -----------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._factor_names[0]).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self._factor_names[0]).device

    def _precision_eigvals(self, delta: Delta, scale: float) -> torch.Tensor:
        """Eigenvalues of P = scale * H + delta * I, shape ``shape``."""
        if not scale > 0:
            raise ValueError(f"scale must be a positive float, got {scale}")
        if not isinstance(delta, torch.Tensor) and delta < 0:
            raise ValueError(f"delta (the prior precision) must be >= 0, got {delta}")
        return scale * self.eigenvalues() + delta

    def _check_trailing(self, name: str, tensor: torch.Tensor, lead: int = 0) -> None:
        nd = len(self.shape)
        if tensor.ndim < nd + lead or tuple(tensor.shape[tensor.ndim - nd :]) != tuple(self.shape):
            expected = ("..., K, " if lead else "..., ") + ", ".join(map(str, self.shape))
            raise ValueError(f"{name} must have shape ({expected}), got {tuple(tensor.shape)}")

    def logdet(self, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """log det(scale * H + delta * I), from the eigenvalues of H; differentiable in ``delta``.

        Args:
            delta (`float` or 0-dim `torch.Tensor`): the prior precision.
            scale (`float`, defaults to 1.0): multiplier of the curvature (temperature / data size).

        Returns:
            `torch.Tensor`: a 0-dim tensor.
        """
        return torch.log(self._precision_eigvals(delta, scale)).sum()

    def mv(self, m: torch.Tensor, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """P m = scale * H m + delta * m for m of shape ``shape`` or a batch (..., *shape); same shape back.

        Uses the factors directly (no eigendecomposition), so where a factor has negative round-off eigenvalues this
        is the unclamped H, while the other methods use its PSD projection.
        """
        self._check_trailing("m", m)
        return scale * self._h_mv(m) + delta * m

    def inv_mv(self, m: torch.Tensor, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """P⁻¹ m for m of shape ``shape`` or a batch (..., *shape); same shape back."""
        self._check_trailing("m", m)
        return self._rotate_out(self._rotate_in(m) / self._precision_eigvals(delta, scale))

    def inv_quad(self, jac: torch.Tensor, delta: Delta, scale: float = 1.0) -> torch.Tensor:
        """The GLM predictive covariance contribution J P⁻¹ Jᵀ of this block.

        Args:
            jac (`torch.Tensor` of shape (..., K, *shape)): K Jacobian rows laid out like the parameters.
            delta (`float` or 0-dim `torch.Tensor`): the prior precision.
            scale (`float`, defaults to 1.0): multiplier of the curvature.

        Returns:
            `torch.Tensor` of shape (..., K, K): entries vec(J_k)ᵀ P⁻¹ vec(J_l).
        """
        self._check_trailing("jac", jac, lead=1)
        # Whitened coordinates: x = Λ^(-1/2) Qᵀ vec(J), so J P⁻¹ Jᵀ = x xᵀ; no (n, n) matrix is formed.
        white = self._rotate_in(jac) / self._precision_eigvals(delta, scale).sqrt()
        white = white.reshape(*white.shape[: white.ndim - len(self.shape)], -1)  # (..., K, n)
        return white @ white.mT

    def sample(
        self, delta: Delta, scale: float = 1.0, n: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws from N(0, P⁻¹): Q Λ^(-1/2) z with z standard normal.

        The noise is drawn on CPU (so a CPU ``generator`` seeds it on every device) in float64 for float64 blocks and
        float32 otherwise, then moved to the block's device and dtype.

        Args:
            delta (`float` or 0-dim `torch.Tensor`): the prior precision.
            scale (`float`, defaults to 1.0): multiplier of the curvature.
            n (`int`, *optional*): number of draws; ``None`` for a single draw without a leading dimension.
            generator (`torch.Generator`, *optional*): a CPU generator for reproducible draws.

        Returns:
            `torch.Tensor` of shape ``shape`` or (n, *shape).
        """
        size = tuple(self.shape) if n is None else (n, *self.shape)
        noise_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        z = torch.randn(size, generator=generator, dtype=noise_dtype, device="cpu")
        z = z.to(device=self.device, dtype=self.dtype)
        return self._rotate_out(z / self._precision_eigvals(delta, scale).sqrt())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors (not the eigenpairs, which are recomputed lazily after loading)."""
        return {name: getattr(self, name) for name in self._factor_names}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CurvatureBlock:
        """Rebuild a block from ``state_dict()``'s output."""
        missing = [name for name in cls._factor_names if name not in state]
        if missing:
            raise KeyError(f"{cls.__name__} state dict lacks {missing}; expected keys {list(cls._factor_names)}")
        return cls(*(state[name] for name in cls._factor_names))

    def add_(self, other: CurvatureBlock) -> CurvatureBlock:
        """Add ``other``'s factors to this block's (in place for the block; the factor tensors are replaced, not
        mutated, so tensors shared with a caller or another block stay as they were). Returns ``self``.

        For a `KronBlock` this sums the statistics G and A separately, as K-FAC accumulates them over batches:
        the result is (G + G') ⊗ (A + A'), not G ⊗ A + G' ⊗ A' (which is not a Kronecker product).
        """
        if type(other) is not type(self):
            raise TypeError(f"cannot add a {type(other).__name__} to a {type(self).__name__}")
        if tuple(other.shape) != tuple(self.shape):
            raise ValueError(f"cannot add blocks of shapes {tuple(other.shape)} and {tuple(self.shape)}")
        for name in self._factor_names:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._invalidate()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class KronBlock(CurvatureBlock):
    """H = G ⊗ A for a weight of shape (out, in), flattened row-major.

    Args:
        G (`torch.Tensor` of shape (out, out)): symmetric PSD output-gradient factor.
        A (`torch.Tensor` of shape (in, in)): symmetric PSD input-activation factor.
    """

    kind = "kron"
    _factor_names = ("G", "A")

    def __init__(self, G: torch.Tensor, A: torch.Tensor) -> None:
        _check_square("G", G)
        _check_square("A", A)
        if G.dtype != A.dtype or G.device != A.device:
            raise ValueError(f"G and A must share dtype and device, got {G.dtype}/{G.device} and {A.dtype}/{A.device}")
        self.G, self.A = G, A
        self._eig: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.G.shape[0], self.A.shape[0]))

    def eigendecompose(self) -> KronBlock:
        """Compute and cache (lg, Qg, la, Qa), eigenvalues clamped at 0, in the factors' dtype."""
        if self._eig is None:
            self._eig = (*_eigh_clamped(self.G), *_eigh_clamped(self.A))
        return self

    def eigenvalues(self) -> torch.Tensor:
        lg, _, la, _ = self.eigendecompose()._eig
        return lg[:, None] * la[None, :]  # (out, in)

    def _rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        _, qg, _, qa = self.eigendecompose()._eig
        return qg.mT @ m @ qa  # (..., out, in)

    def _rotate_out(self, x: torch.Tensor) -> torch.Tensor:
        _, qg, _, qa = self.eigendecompose()._eig
        return qg @ x @ qa.mT

    def _h_mv(self, m: torch.Tensor) -> torch.Tensor:
        # (G ⊗ A) vec(M) = vec(G M Aᵀ) for row-major vec.
        return self.G @ m @ self.A.mT

    def to_dense(self) -> torch.Tensor:
        return torch.kron(self.G, self.A)

    def scaled(self, c: float) -> KronBlock:
        """c (G ⊗ A) = (c G) ⊗ A; a cached eigendecomposition is carried over when c >= 0."""
        out = KronBlock(c * self.G, self.A)
        if self._eig is not None and c >= 0:
            lg, qg, la, qa = self._eig
            out._eig = (c * lg, qg, la, qa)
        return out


class DiagBlock(CurvatureBlock):
    """H = diag(d) over parameters of d's shape (typically a weight's (out, in)).

    Args:
        d (`torch.Tensor`): the non-negative diagonal of H, laid out like the parameters.
    """

    kind = "diag"
    _factor_names = ("d",)

    def __init__(self, d: torch.Tensor) -> None:
        if d.ndim == 0 or d.numel() == 0:
            raise ValueError(f"d must be a non-empty tensor with at least one dimension, got shape {tuple(d.shape)}")
        self.d = d

    @property
    def shape(self) -> torch.Size:
        return self.d.shape

    def eigenvalues(self) -> torch.Tensor:
        return self.d

    def _rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def _rotate_out(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _h_mv(self, m: torch.Tensor) -> torch.Tensor:
        return self.d * m

    def to_dense(self) -> torch.Tensor:
        return torch.diag(self.d.flatten())

    def scaled(self, c: float) -> DiagBlock:
        return DiagBlock(c * self.d)


class DenseBlock(CurvatureBlock):
    """A dense H over a flat parameter vector of length n (the ``full`` structure: one block for all parameters).

    Args:
        H (`torch.Tensor` of shape (n, n)): symmetric PSD curvature.
    """

    kind = "full"
    _factor_names = ("H",)

    def __init__(self, H: torch.Tensor) -> None:
        _check_square("H", H)
        self.H = H
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.H.shape[0],))

    def eigendecompose(self) -> DenseBlock:
        """Compute and cache (l, Q), eigenvalues clamped at 0, in H's dtype."""
        if self._eig is None:
            self._eig = _eigh_clamped(self.H)
        return self

    def eigenvalues(self) -> torch.Tensor:
        return self.eigendecompose()._eig[0]

    def _rotate_in(self, m: torch.Tensor) -> torch.Tensor:
        return m @ self.eigendecompose()._eig[1]  # rows of m are vectors: (Qᵀ m)ᵀ = mᵀ Q

    def _rotate_out(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.eigendecompose()._eig[1].mT

    def _h_mv(self, m: torch.Tensor) -> torch.Tensor:
        return m @ self.H.mT

    def to_dense(self) -> torch.Tensor:
        return self.H

    def scaled(self, c: float) -> DenseBlock:
        """c H; a cached eigendecomposition is carried over when c >= 0."""
        out = DenseBlock(c * self.H)
        if self._eig is not None and c >= 0:
            out._eig = (c * self._eig[0], self._eig[1])
        return out
