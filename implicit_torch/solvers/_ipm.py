"""Mehrotra's predictor-corrector interior-point method for a batch of QPs, in PyTorch.

:class:`_IPM` holds the matrices formed once per batch and one iteration; :meth:`_IPM.solve` is
the loop, on the package's driver (:func:`implicit_torch._loop.iterate`). The extension's CPU
kernel ``implicit_torch::qp_ipm`` runs the same iterations from the same matrices
(:class:`~implicit_torch.solvers.qp.QP` chooses between them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._loop import Cadence, iterate
from implicit_torch._result import status_codes
from implicit_torch.solvers._qp_data import _Data, _kkt_matrix, _sym

Tensor = torch.Tensor

# Iterations without improvement after which a problem stops at its best iterate.
_PATIENCE = 3


class _LoopState(NamedTuple):
    """The loop's state: the iterate ``u`` (B, 1, N + m) and its residual ``R`` (B, 1, N);
    the best iterate so far and its error (B,); iterations without improvement and
    iterations run per problem (B,), int64."""

    u: Tensor
    R: Tensor
    best: Tensor
    best_error: Tensor
    stall: Tensor
    iters: Tensor


class _IPM:
    """Mehrotra's predictor-corrector primal-dual interior-point method, batched.

    With slacks ``s = h − Gx ≥ 0`` the iterates ``(x, ν, λ, s)`` keep ``s, λ > 0`` and
    follow the central path ``s ⊙ λ = σμ`` (``μ = sᵀλ / m``). The Newton system

        Qₛ dx + Aᵀ dν + Gᵀ dλ = −r_d,   A dx = −r_p,   G dx + ds = −r_i,   Λ ds + S dλ = −r_c

    (``r_d = Qₛx + c + Aᵀν + Gᵀλ``, ``r_p = Ax − b``, ``r_i = Gx + s − h``) is reduced to the
    constraints' multipliers ``y = (dν, dλ)``: with ``C = [A; G]`` and ``W = C Qₛ⁻¹ Cᵀ``,

        (W + diag(0, s/λ)) y = [r_p; r_i − r_c/λ] − C Qₛ⁻¹ r_d,

    then ``dx = −Qₛ⁻¹(r_d + Cᵀ y)`` and ``ds = −r_i − G dx``. This ``(p+m)``-square matrix is
    symmetric positive definite (for ``Qₛ`` positive definite and ``A`` of full row rank) and
    stays well conditioned as ``s/λ`` goes to 0 or ∞ on active or inactive constraints, where
    the primal form ``Qₛ + Gᵀ diag(λ/s) G`` does not (its Cholesky fails in float32). ``Qₛ⁻¹``
    and ``W`` are computed once; each iteration is one batched Cholesky factorisation, shared
    by the affine (predictor, ``r_c = s ⊙ λ``) and the corrector step (``r_c = s ⊙ λ +
    ds_aff ⊙ dλ_aff − σμ`` with ``σ = (μ_aff / μ)³``; Mehrotra, 1992). Steps go 0.99 of the
    way to the boundary of ``s, λ ≥ 0``. The start is CVXOPT's: the solution of the Newton
    system with ``s/λ = 1`` from zero, with ``s`` and ``λ`` shifted to be positive
    (Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010).

    Layout and fused products. The iterate is one row ``u = [x; ν; λ; s]`` (B, 1, N + m),
    ``N = n + p + m``, and the linear maps are batched row-times-matrix products with matrices
    formed once (the per-operation overhead of tiny tensors dominates on the CPU, and a
    row-times-matrix product is several times faster there than matrix-times-column):

    * ``R = [r_d; r_p; Gx − h] = u[:N] K + [c; −b; −h]``, with ``K`` the symmetric KKT matrix
      of :func:`_kkt_matrix`; ``r_i = (Gx − h) + s``;
    * ``r_d [−Qₛ⁻¹, −Qₛ⁻¹Cᵀ]`` gives ``−Qₛ⁻¹ r_d`` and ``−C Qₛ⁻¹ r_d``;
    * ``du = [dx; y; ds] = [−Qₛ⁻¹ r_d; 0; G Qₛ⁻¹ r_d − r_i] + y T`` with
      ``T = [−C Qₛ⁻¹, I, C Qₛ⁻¹ Gᵀ]``.

    What it cannot solve, found by :meth:`diagnose` (the same for the compiled kernel, which
    runs these iterations from these matrices): a ``Qₛ`` that is not positive definite (its
    Cholesky factorisation fails: indefinite, the problem is not convex; or singular), linearly
    dependent equality constraints (``A Qₛ⁻¹ Aᵀ`` singular), and infeasible constraints (a
    Farkas certificate, :meth:`certify_infeasible`).
    """

    def __init__(self, data: _Data, Q, c, A, b, G, h):
        self.data = data
        B, n, p, m, N = data.B, data.n, data.p, data.m, data.N
        self.n, self.p, self.m, self.N = n, p, m, N
        k = p + m
        Qs = _sym(Q)
        K = _kkt_matrix(data, Qs, A, G)
        dtype, device = K.dtype, K.device
        eye_k = torch.eye(k, dtype=dtype, device=device).expand(B, k, k)
        zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
        self.K = K
        q = [c.expand(B, n)]
        if A is not None:
            q.append(-b.expand(B, p))
        q.append(-h.expand(B, m))
        self.q = torch.cat(q, -1).unsqueeze(1)  # (B, 1, N)
        L, q_info = torch.linalg.cholesky_ex(Qs.expand(B, n, n))
        self.q_not_pd = q_info != 0  # (B,): Qₛ is not positive definite (see diagnose)
        Ct = K[:, :n, n:]  # [A; G]ᵀ, (B, n, p+m)
        eye_n = torch.eye(n, dtype=dtype, device=device).expand(B, n, n)
        X = torch.cholesky_solve(torch.cat([eye_n, Ct], -1), L)  # [Qₛ⁻¹, Qₛ⁻¹Cᵀ]
        self.W = Ct.mT @ X[..., n:]  # C Qₛ⁻¹ Cᵀ, (B, p+m, p+m)
        # A Qₛ⁻¹ Aᵀ, the equality block of W, is positive definite iff A has full row rank.
        self.dependent_eq = torch.zeros_like(self.q_not_pd)
        if p:
            self.dependent_eq = torch.linalg.cholesky_ex(self.W[:, :p, :p])[1] != 0
        self.M1 = -X  # (n, n + p + m)
        self.neg_Qinv, self.nqc = self.M1[..., :n], self.M1[..., n:]  # −Qₛ⁻¹ (symmetric), −Qₛ⁻¹Cᵀ
        W, nqc = self.W, self.nqc
        self.zeros_k = zeros(B, 1, k)
        self.T = torch.cat([nqc.mT, eye_k, W[..., p:]], -1)  # (p+m, n + p + 2m)
        self.neg_Gt = -Ct[..., p:]
        self.h = h.expand(B, m).unsqueeze(1)

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``R = [r_d; r_p; Gx − h]`` (B, 1, N) and the error of :func:`_kkt_error` (B,)."""
        k, N = self.n + self.p, self.N
        R = torch.baddbmm(self.q, u[..., :N], self.K)
        gap = R[..., k:]
        error = torch.maximum(
            torch.cat([R[..., :k], u[..., k:N] * gap], -1).abs().amax((1, 2)), gap.amax((1, 2))
        )
        return R, error

    def start(self) -> Tensor:
        B, n, p, m = self.data.B, self.n, self.p, self.m
        L = self._factor(torch.ones(B, m, dtype=self.q.dtype, device=self.q.device))
        c = self.q[..., :n]
        # (W + diag(0, I)) y = −C Qₛ⁻¹ c − [b; h]; x = −Qₛ⁻¹(c + Cᵀ y).
        rhs = torch.baddbmm(self.q[..., n:], c, self.nqc)
        y = torch.cholesky_solve(rhs.mT, L).mT
        x = torch.baddbmm(c @ self.neg_Qinv, y, self.nqc.mT)
        s0 = torch.baddbmm(self.h, x, self.neg_Gt)  # h − Gx
        # CVXOPT's shift: s = s0 + (1 + α_p) if α_p = −min s0 ≥ 0; λ likewise from −s0.
        ap = -s0.amin(-1, keepdim=True)
        s = torch.where(ap >= 0, s0 + 1 + ap, s0)
        ad = s0.amax(-1, keepdim=True)
        lam = torch.where(ad >= 0, 1 + ad - s0, -s0)
        return torch.cat([x, y[..., :p], lam, s], -1)

    def _factor(self, d: Tensor) -> Tensor:
        """Cholesky factor of ``W + diag(0, d)``; ``d`` (B, m)."""
        if self.p:
            d = torch.cat([d.new_zeros(d.shape[0], self.p), d], -1)
        return torch.linalg.cholesky_ex(self.W + torch.diag_embed(d))[0]

    def step(self, u: Tensor, R: Tensor) -> Tensor:
        """One predictor-corrector step from ``u = [x; ν; λ; s]`` with residual ``R``."""
        p, m, N = self.p, self.m, self.N
        k = self.n + p
        v = u[..., k:]  # [λ; s]
        lam, s = u[..., k:N], u[..., N:]
        inv_lam = lam.reciprocal()
        L = self._factor((s * inv_lam).squeeze(1))
        n = self.n
        P = R[..., :n] @ self.M1  # [−Qₛ⁻¹ r_d; −C Qₛ⁻¹ r_d]
        Y_i = P[..., n + p :] + R[..., k:] + s  # r_i − G Qₛ⁻¹ r_d
        if p:
            Y_e = P[..., n : n + p] + R[..., n:k]
        D0 = torch.cat([P[..., :n], self.zeros_k, -Y_i], -1)
        sl = s * lam
        neg_inv_v = -1.0 / v

        def direction(rc):
            r = torch.addcmul(Y_i, rc, inv_lam, value=-1.0)
            if p:
                r = torch.cat([Y_e, r], -1)
            y = torch.cholesky_solve(r.mT, L).mT
            return torch.baddbmm(D0, y, self.T)  # [dx; dν; dλ; ds]

        # Predictor (affine scaling). The largest α ≤ 1 with v + α dv ≥ 0 is
        # 1 / max(1, max_i(−dv_i / v_i)).
        du = direction(sl)
        dv = du[..., k:]
        alpha = (dv * neg_inv_v).amax(-1, keepdim=True).clamp_min(1.0).reciprocal()
        t = torch.addcmul(v, alpha, dv)
        ratio = (t[..., :m] * t[..., m:]).sum(-1, keepdim=True) / sl.sum(-1, keepdim=True)
        sigma_mu = ratio.clamp(0, 1) ** 3 * sl.mean(-1, keepdim=True)
        # Corrector (Mehrotra's second-order term and centring), 0.99 of the way to the
        # boundary.
        du = direction(torch.addcmul(sl - sigma_mu, du[..., N:], dv[..., :m]))
        alpha = 0.99 / (du[..., k:] * neg_inv_v).amax(-1, keepdim=True).clamp_min(0.99)
        return torch.addcmul(u, alpha, du)

    def diagnose(
        self, z: Tensor, error: Tensor, converged: Tensor, maxiter: int, cadence: Cadence
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The outcome of a finished solve (by :meth:`solve` or the compiled kernel) with what
        the iterations could not have solved named: ``(z, error, converged, status)``, ``status``
        the per-problem :class:`~implicit_torch._result.Status` codes.

        * ``UNBOUNDED``: ``Qₛ`` is not positive semidefinite (its Cholesky factorisation fails,
          and still fails with a shift of ``10 n eps ‖Qₛ‖max``): the problem is not convex.
        * ``SINGULAR``: ``Qₛ`` is positive semidefinite but singular, or the equality
          constraints are linearly dependent; the method needs ``Qₛ`` positive definite and
          ``A`` of full row rank.
        * ``INFEASIBLE``: a problem that did not converge and has a Farkas certificate
          (:meth:`certify_infeasible`; only where values can be read).

        A problem of the first two kinds gets NaN in ``z`` and ``error`` (the iterations ran on
        a meaningless factorisation: a point they found, e.g. a saddle point, is not returned).
        """
        n = self.n
        broken = self.q_not_pd | self.dependent_eq
        indefinite = torch.zeros_like(broken)
        if not cadence.inspect or bool(self.q_not_pd.any()):
            Qs = self.K[:, :n, :n]
            eps = torch.finfo(Qs.dtype).eps
            shift = 10 * n * eps * Qs.abs().amax((1, 2)) + torch.finfo(Qs.dtype).tiny
            eye = torch.eye(n, dtype=Qs.dtype, device=Qs.device)
            shifted = torch.linalg.cholesky_ex(Qs + shift[:, None, None] * eye)[1] != 0
            indefinite = self.q_not_pd & shifted
        z = torch.where(broken[:, None], math.nan, z)
        error = torch.where(broken, math.nan, error)
        converged = converged & ~broken
        infeasible = torch.zeros_like(broken)
        candidates = ~converged & ~broken
        if cadence.inspect and bool(candidates.any()):
            infeasible = self.certify_infeasible(candidates, maxiter, cadence)
        status = status_codes(
            converged, error, unbounded=indefinite, singular=broken, infeasible=infeasible
        )
        return z, error, converged, status

    def certify_infeasible(self, candidates: Tensor, maxiter: int, cadence: Cadence) -> Tensor:
        """Per problem (B,), whether the ``candidates`` have a Farkas certificate of
        infeasibility: multipliers ``y = (ν, λ)``, ``λ ≥ 0``, with ``Aᵀν + Gᵀλ ≈ 0`` and
        ``bᵀν + hᵀλ < 0`` (no ``x`` then has ``A x = b``, ``G x ≤ h``: ``0 ≈ yᵀC x ≤ yᵀd <
        0``).

        On an infeasible problem the interior-point iterates' multipliers grow without bound
        in the direction of such a certificate, while the loop (and the kernel) stop early at
        their best iterate. So the iterations are run again here, from the start, without
        that stop, for the candidates only (at most ``maxiter``, until each has a certificate
        or a non-finite iterate). A certificate is accepted when ``‖Cᵀy‖∞ ‖d‖∞ ≤ √eps ·
        (−dᵀy) ‖C‖max`` (``C = [A; G]``, ``d = [b; h]``): any feasible point would need
        ``‖x‖₁ ≥ ‖d‖∞ / (√eps ‖C‖max)``, about 1e8 times the data's own scale in float64.
        """
        n, N = self.n, self.N
        C = self.K[:, n:N, :n]  # [A; G], (B, p+m, n)
        d = -self.q[..., n:]  # [b; h], (B, 1, p+m)
        bound = math.sqrt(torch.finfo(C.dtype).eps) * C.abs().amax((1, 2))
        d_scale = d.abs().amax((1, 2))

        def certified(u: Tensor) -> Tensor:
            y = u[..., n:N]
            gap = (y * d).sum((1, 2))
            residual = (y @ C).abs().amax((1, 2))
            return candidates & (gap < 0) & (residual * d_scale <= bound * -gap)

        def active(s: tuple[Tensor, Tensor]) -> Tensor:
            return candidates & ~s[1] & torch.isfinite(s[0]).all(-1).all(-1)

        def step(s: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            running = active(s)
            R, _ = self.residual(s[0])
            u = torch.where(running[:, None, None], self.step(s[0], R), s[0])
            return u, s[1] | certified(u)

        with torch.no_grad():
            u = self.start()
            (_, found), _ = iterate(
                step, (u, certified(u)), active=active, maxiter=maxiter, cadence=cadence
            )
        return found

    def limit(self, tol: float) -> Tensor:
        """``tol · (1 + ‖[c; b; h]‖∞)`` per problem (B,): residuals are computed to about
        machine precision times the size of the data, so tolerances are relative to it."""
        return tol * (1 + self.q.abs().amax((1, 2)))

    def solve(
        self,
        maxiter: int,
        tol: float,
        acceptable_tol: float,
        cadence: Cadence,
        on_check: Callable[[int, Any], Any] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Iterate from :meth:`start`; each problem stops once its error is at most
        ``limit(tol)`` or it has not improved for ``_PATIENCE`` iterations, and the best iterate
        is kept: once ``μ`` nears the precision limit the reduced matrix is so ill-conditioned
        that further steps can lose accuracy. Every step is masked per problem, so the result
        does not depend on the cadence of the host checks.

        Returns:
            ``(z, iterations, error, converged)``: the best ``z = [x; ν; λ]`` (B, N), the
            iterations run (B,) int64, its error (B,) and whether it met ``tol``, or stalled
            below ``acceptable_tol`` (IPOPT's "acceptable" termination: in float32 the
            attainable accuracy varies by problem).
        """
        limit = self.limit(tol)
        u = self.start()
        R, error = self.residual(u)
        stall = torch.zeros(self.data.B, dtype=torch.int64, device=u.device)
        state = _LoopState(u, R, u, error, stall, torch.zeros_like(stall))

        def active(s: _LoopState) -> Tensor:
            return (s.best_error > limit) & (s.stall < _PATIENCE)

        def step(s: _LoopState) -> _LoopState:
            running = active(s)
            u = torch.where(running[:, None, None], self.step(s.u, s.R), s.u)
            R, error = self.residual(u)
            improved = error < s.best_error
            return _LoopState(
                u,
                R,
                torch.where(improved[:, None, None], u, s.best),
                torch.where(improved, error, s.best_error),
                torch.where(improved, 0, s.stall + running),
                s.iters + running,
            )

        state, _ = iterate(
            step, state, active=active, maxiter=maxiter, cadence=cadence, on_check=on_check
        )
        acceptable = self.limit(acceptable_tol)
        converged = (state.best_error <= limit) | (
            (state.stall >= _PATIENCE) & (state.best_error <= acceptable)
        )
        return state.best[:, 0, : self.N], state.iters, state.best_error, converged
