"""The implicit-derivative linear solver of :class:`~implicit_torch.solvers.qp.QP`: the KKT
Jacobian solved through its structure, with the interior point's reduced system."""

from __future__ import annotations

from typing import Any

import torch

from implicit_torch.linear import solve_lu
from implicit_torch.solvers._ipm import _IPM

__all__ = ["KKTLinearSolve"]

Tensor = torch.Tensor


class KKTLinearSolve:
    """``J w = r`` or ``Jᵀ u = v`` for the Jacobian ``J`` of a QP's KKT residual at its
    solution, by one batched Cholesky factorisation.

    At ``z = [x; ν; λ]`` the Jacobian of the KKT residual (:func:`_kkt_residual`) is

        J = [[Qₛ, Aᵀ, Gᵀ], [A, 0, 0], [diag(λ) G, 0, diag(g)]],    g = Gx − h,

    and with ``d = −g/λ`` (the interior point's ``s/λ`` at the solution) both systems reduce
    to the forward solve's symmetric positive definite system
    ``(C Qₛ⁻¹ Cᵀ + diag(0, d)) y = C Qₛ⁻¹ r₁ − [r₂; r̃₃]`` (``C = [A; G]``), whose factorisation
    all solves share:

    * ``J w = r``: ``r̃₃ = r₃/λ``, ``(w₂, w₃) = y``, ``w₁ = Qₛ⁻¹(r₁ − Cᵀy)``;
    * ``Jᵀ u = v``: ``r̃₃ = v₃``, ``(u₂, λ ⊙ u₃) = y``, ``u₁ = Qₛ⁻¹(v₁ − Cᵀy)``.

    The engine calls ``solve(matvec, r)`` with a :class:`~implicit_torch.linear.LinearOperator`
    whose ``transposed`` says which of ``Jᵀ`` (reverse mode) and ``J`` (forward mode) it
    applies. Given a plain function instead, or a right-hand side that is not the flat
    ``(B, N)`` system of the bound solution, the system is solved by
    :func:`~implicit_torch.solve_lu` on ``matvec``.

    One object per solution: :meth:`QP.run <implicit_torch.solvers.qp.QP.run>` builds a fresh
    one for every run, hands it to the engine as that run's linear solver, and its forward
    binds it to the solution (:meth:`bind`). The factorisation thus travels with the solution:
    the derivatives of two runs never share one, and the QP object is never modified. Passing
    ``implicit_diff_solve=KKTLinearSolve()`` to a QP is the same as leaving it None.
    """

    def __init__(self):
        self._z: Tensor | None = None
        self._ipm: _IPM | None = None
        self._factors: tuple[Tensor, Tensor] | None = None

    def bind(self, z: Tensor, ipm: _IPM) -> None:
        """Linearise at the solution ``z`` (B, N) of the problems whose matrices ``ipm``
        holds (the forward's, formed once)."""
        self._z, self._ipm, self._factors = z, ipm, None

    def __call__(self, matvec: Any, r: Any) -> Any:
        transposed = getattr(matvec, "transposed", None)
        if transposed is None or not (
            self._z is not None and isinstance(r, Tensor) and r.shape == self._z.shape
        ):
            return solve_lu(matvec, r, batched=True)
        return self._solve(r, transpose=transposed)

    def _cholesky(self) -> tuple[Tensor, Tensor]:
        """The Cholesky factor of ``W + diag(0, −g/λ)`` and ``λ`` (B, 1, m), computed at the
        first solve and kept."""
        if self._factors is None:
            ipm = self._ipm
            k, N = ipm.n + ipm.p, ipm.N
            z = self._z.to(ipm.q.dtype)
            lam = z[:, k:N].unsqueeze(1)
            gap = torch.baddbmm(ipm.q[..., k:], z.unsqueeze(1), ipm.K[..., k:])  # Gx − h
            self._factors = ipm._factor((-gap / lam).squeeze(1)), lam
        return self._factors

    def _solve(self, r: Tensor, transpose: bool) -> Tensor:
        ipm = self._ipm
        L, lam = self._cholesky()
        n, p = ipm.n, ipm.p
        dtype = r.dtype
        r = r.to(ipm.q.dtype).unsqueeze(1)
        r1, rest = r[..., :n], r[..., n:]
        if not transpose:
            rest = torch.cat([rest[..., :p], rest[..., p:] / lam], -1)
        rhs = -(r1 @ ipm.nqc) - rest  # C Qₛ⁻¹ r₁ − [r₂; r̃₃]
        y = torch.cholesky_solve(rhs.mT, L).mT
        w1 = torch.baddbmm(-(r1 @ ipm.neg_Qinv), y, ipm.nqc.mT)
        if transpose:
            y = torch.cat([y[..., :p], y[..., p:] / lam], -1)
        return torch.cat([w1, y], -1).squeeze(1).to(dtype)
