"""Projection layers: onto the simplex (sparsemax) and the Birkhoff polytope."""

from __future__ import annotations

import torch
from torch import nn

from implicit_torch._result import check_maxiter, check_on_failure, check_tolerances
from implicit_torch.projection import kl_projection_birkhoff, projection_birkhoff
from implicit_torch.projection._sets import check_simplex_input, check_simplex_value, simplex_rows

__all__ = ["BirkhoffProjection", "SimplexProjection", "Sparsemax"]

Tensor = torch.Tensor


class SimplexProjection(nn.Module):
    """``argmin_{p ∈ Δ} ‖p − x‖²`` along ``dim``, with ``Δ = {p ≥ 0, Σp = value}``.

    The Jacobian is exact (``diag(s) − s sᵀ/|s|`` on the support ``s``), from
    :func:`implicit_torch.projection.simplex_rows`. Any shape with a non-empty ``dim``, which
    is projected; ``value`` finite and non-negative. Edge values as in
    :func:`~implicit_torch.projection.projection_simplex` (``+inf`` entries share the mass,
    ``−inf`` ones get 0, NaN stays NaN).
    """

    def __init__(self, dim: int = -1, value: float = 1.0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{type(self).__name__}: dim must be an int, got {dim!r}")
        check_simplex_value(type(self).__name__, value)
        self.dim, self.value = dim, value

    def forward(self, x: Tensor) -> Tensor:
        who = type(self).__name__
        if isinstance(x, Tensor) and x.dim() == 0:
            check_simplex_input(who, x, self.value)  # a clear error before movedim's
        rows = simplex_rows(x.movedim(self.dim, -1), self.value, who=who)
        return rows.movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, value={self.value}"


class Sparsemax(SimplexProjection):
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of the scores onto the
    probability simplex along ``dim``; like softmax, but with exact zeros."""

    def __init__(self, dim: int = -1):
        super().__init__(dim=dim, value=1.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class BirkhoffProjection(nn.Module):
    """Score matrices ``S`` (``(..., n, n)``) to doubly-stochastic matrices ``P``.

    * ``kind="kl"``: ``P = argmin_{P ∈ B} KL(P ‖ exp S)``, Sinkhorn's normalisation (dense,
      positive ``P``), differentiated through the Sinkhorn fixed point
      (:func:`implicit_torch.projection.kl_projection_birkhoff`);
    * ``kind="euclidean"``: ``P = argmin_{P ∈ B} ‖P − S‖²`` (sparse ``P``; a permutation for
      well-separated scores), differentiated through its optimality conditions
      (:func:`implicit_torch.projection.projection_birkhoff`).

    Leading dimensions are a batch, projected one matrix at a time. Non-convergence within
    ``maxiter`` iterations warns (``on_failure="raise"``: an error).
    """

    def __init__(
        self, kind: str = "kl", *, maxiter: int = 1000, tol: float = 1e-6, on_failure="warn"
    ):
        super().__init__()
        if kind not in ("kl", "euclidean"):
            raise ValueError(f"kind must be 'kl' or 'euclidean', got {kind!r}")
        check_tolerances(tol)
        self.kind, self.maxiter, self.tol = kind, check_maxiter(maxiter), tol
        self.on_failure = check_on_failure(on_failure)

    def forward(self, scores: Tensor) -> Tensor:
        if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
            raise ValueError(
                f"BirkhoffProjection: scores must have shape (..., n, n), got {tuple(scores.shape)}"
            )
        project = kl_projection_birkhoff if self.kind == "kl" else projection_birkhoff
        flat = scores.reshape(-1, *scores.shape[-2:])
        out = [project(S, self.maxiter, self.tol, self.on_failure) for S in flat.unbind(0)]
        return torch.stack(out).reshape(scores.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, maxiter={self.maxiter}, tol={self.tol}"
