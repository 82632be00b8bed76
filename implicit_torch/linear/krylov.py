"""Matrix-free iterative solvers on a :class:`~implicit_torch.linear.operator.FlatSystem`.

Each returns ``(x, iterations, converged, failures)``: the ``(B, N)`` iterate, per-system
iteration counts and convergence flags, and a dict of per-system failure masks keyed by a
lower-case :class:`~implicit_torch._result.Status` name (``"indefinite"``, ``"breakdown"``,
``"diverged"``). Every loop runs on the one driver, :func:`implicit_torch._loop.iterate`:
finished systems are frozen by masking, and the host reads convergence at the driver's cadence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from implicit_torch._loop import Cadence, iterate
from implicit_torch.linear.operator import FlatSystem, dot, norm

__all__ = ["bicgstab", "cg", "gmres", "neumann"]

Tensor = torch.Tensor


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(1)


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 0 elsewhere (never divides by zero, so no NaN leaks)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _cadence(sys: FlatSystem) -> Cadence:
    return Cadence(sys.b.device, sys.b)


# --------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------


class _CG(NamedTuple):
    x: Tensor
    r: Tensor
    z: Tensor
    p: Tensor
    rz: Tensor
    sign: Tensor  # the sign of the first curvature pᵀAp (0 before the first step)
    iters: Tensor
    indefinite: Tensor
    active: Tensor


# Residual replacement: a system whose recurrence residual met the target while its true
# residual ‖b − A x‖ did not (drift, on ill-conditioned systems) is restarted from its iterate,
# with r = b − A x recomputed, at most this many times.
CG_RESTARTS = 2


def cg(sys: FlatSystem, maxiter: int):
    """Preconditioned conjugate gradient with residual replacement (see :func:`_cg_run`).

    Where values can be read, a system whose recurrence claims convergence is checked against
    its true residual and restarted from its iterate when that misses the target, within the
    remaining ``maxiter`` budget (``CG_RESTARTS`` times at most).
    """
    x, iters, conv, failures = _cg_run(sys, maxiter)
    for _ in range(CG_RESTARTS if sys.inspect else 0):
        redo = conv & (sys.residual_norm(x) > sys.threshold) & (iters < maxiter)
        if not bool(redo.any()):
            break
        left = maxiter - int(iters[redo].min())
        x2, iters2, conv2, failures2 = _cg_run(sys.restarted_from(x), left)
        x = torch.where(_col(redo), x2, x)
        iters = iters + torch.where(redo, iters2, 0)
        conv = torch.where(redo, conv2, conv)
        failures = {"indefinite": failures["indefinite"] | (redo & failures2["indefinite"])}
    return x, iters, conv, failures


def _cg_run(sys: FlatSystem, maxiter: int):
    """Preconditioned conjugate gradient, one step size per system.

    Works for symmetric definite systems of either sign (CG on ``−A`` has the same iterates).
    A curvature ``pᵀAp`` that is zero or changes sign marks the system indefinite and freezes
    it. Where values are read every iteration (the CPU), plain unmasked steps are taken while
    every system is still running; the masked loop, which freezes finished systems, takes over
    once one converges or fails (or from the start on an accelerator and under vmap).
    """
    x = sys.x0
    r = sys.b - sys.A(x) if sys.init_given else sys.b  # skip a matvec for the zero start
    z = sys.M(r)
    p = z
    rz = dot(r, z)
    sign = torch.zeros_like(rz)
    cadence = _cadence(sys)
    done = 0
    if cadence.every_step:
        done, x, r, z, p, rz, sign = _cg_while_all_active(sys, maxiter, x, r, z, p, rz)
    active = norm(r) > sys.threshold
    iters = torch.full((sys.shape[0],), done, dtype=torch.int64, device=x.device)
    state = _CG(x, r, z, p, rz, sign, iters, torch.zeros_like(active), active)

    def step(s: _CG) -> _CG:
        Ap = sys.A(s.p)
        pAp = dot(s.p, Ap)
        sign = torch.where(s.sign == 0, torch.sign(pAp), s.sign)
        bad = s.active & ((pAp == 0) | (torch.sign(pAp) != sign))
        ok = s.active & ~bad
        alpha = _col(_safe_div(s.rz, pAp, ok))
        x = torch.addcmul(s.x, alpha, s.p)
        r = torch.addcmul(s.r, alpha, Ap, value=-1)
        z = sys.M(r)
        rz_new = dot(r, z)
        beta = _safe_div(rz_new, s.rz, ok)
        p = torch.where(_col(ok), torch.addcmul(z, _col(beta), s.p), s.p)
        rz = torch.where(ok, rz_new, s.rz)
        iters = s.iters + ok.to(s.iters.dtype)
        active = ok & (norm(r) > sys.threshold)
        return _CG(x, r, z, p, rz, sign, iters, s.indefinite | bad, active)

    s, _ = iterate(
        step, state, active=lambda s: s.active, maxiter=maxiter, cadence=cadence, start=done
    )
    converged = (norm(s.r) <= sys.threshold) & ~s.indefinite
    return s.x, s.iters, converged, {"indefinite": s.indefinite}


def _cg_while_all_active(sys: FlatSystem, maxiter: int, x, r, z, p, rz):
    """Unmasked CG steps for as long as every system is running (two host reads a step).

    Stops before a step whose curvature is non-positive or changes sign, and after a step that
    brings any system to convergence (or to NaN), leaving the rest to the masked loop.
    """
    unpreconditioned = not sys.preconditioned
    rr = rz if unpreconditioned else dot(r, r)
    thresh2 = sys.threshold**2
    sign = torch.zeros_like(rz)
    k = 0
    if not bool((rr > thresh2).all()):
        return k, x, r, z, p, rz, sign
    while k < maxiter:
        Ap = sys.A(p)
        pAp = dot(p, Ap)
        if k == 0:
            sign = torch.sign(pAp)
        if bool((pAp * sign <= 0).any()):
            break
        alpha = _col(rz / pAp)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, Ap, value=-1)
        z = r if unpreconditioned else sys.M(r)
        rz_new = dot(r, z)
        p = torch.addcmul(z, _col(rz_new / rz), p)
        rz = rz_new
        rr = rz if unpreconditioned else dot(r, r)
        k += 1
        if not bool((rr > thresh2).all()):
            break
    return k, x, r, z, p, rz, sign


# --------------------------------------------------------------------------------------------
# Richardson / Neumann series
# --------------------------------------------------------------------------------------------


class _Richardson(NamedTuple):
    x: Tensor
    r: Tensor
    iters: Tensor
    diverged: Tensor
    active: Tensor


def neumann(sys: FlatSystem, maxiter: int, alpha: float = 1.0, fixed_steps: bool = False):
    """Richardson iteration ``x ← x + α ω M(b − A x)`` with ``ω = ±1`` per system, the sign of
    ``⟨r₀, A r₀⟩``: from ``x = 0``, without ``M`` and with ``α = 1``, the partial sums of the
    Neumann series of ``(ωA)⁻¹``. The sign makes a fixed-point condition converge whichever
    way it is written: ``A = I − ∂f/∂z`` (``F = z − f(z)``) or ``A = ∂f/∂z − I``
    (``F = f(z) − z``, the engine's form for fixed points).

    Converges iff the spectral radius of ``I − αωMA`` is below 1 (for fixed points with
    ``α = 1``: ``f`` contractive). A system whose residual grows 1e6-fold or becomes
    non-finite is frozen as diverged. With ``fixed_steps``, exactly ``maxiter`` terms are summed
    whatever the residual (torchopt's truncated Neumann series); only divergence freezes a
    system then.
    """
    x = sys.x0
    r = sys.b - sys.A(x) if sys.init_given else sys.b
    r0 = norm(r)
    omega = _col(torch.where(dot(r, sys.A(r)) < 0, -alpha, alpha).to(r.dtype))
    active = torch.ones_like(r0, dtype=torch.bool) if fixed_steps else r0 > sys.threshold
    iters = torch.zeros(sys.shape[0], dtype=torch.int64, device=x.device)
    state = _Richardson(x, r, iters, torch.zeros_like(active), active)

    def step(s: _Richardson) -> _Richardson:
        x = torch.where(_col(s.active), s.x + omega * sys.M(s.r), s.x)
        r = torch.where(_col(s.active), sys.b - sys.A(x), s.r)
        rn = norm(r)
        bad = s.active & (~torch.isfinite(rn) | (rn > 1e6 * r0))
        active = s.active & ~bad
        if not fixed_steps:
            active = active & (rn > sys.threshold)
        return _Richardson(x, r, s.iters + s.active.to(s.iters.dtype), s.diverged | bad, active)

    s, _ = iterate(step, state, active=lambda s: s.active, maxiter=maxiter, cadence=_cadence(sys))
    converged = (norm(s.r) <= sys.threshold) & ~s.diverged
    return s.x, s.iters, converged, {"diverged": s.diverged}


# --------------------------------------------------------------------------------------------
# BiCGSTAB
# --------------------------------------------------------------------------------------------


class _BiCGSTAB(NamedTuple):
    x: Tensor
    r: Tensor
    p: Tensor
    v: Tensor
    rho: Tensor
    alpha: Tensor
    omega: Tensor
    iters: Tensor
    broken: Tensor
    active: Tensor


def bicgstab(sys: FlatSystem, maxiter: int):
    """Preconditioned BiCGSTAB (van der Vorst, 1992), per-system scalars and convergence.

    A breakdown (``r̂ᵀr = 0`` or ``r̂ᵀv = 0`` before convergence) freezes the system and
    reports it as not converged.
    """
    B, _ = sys.shape
    x = sys.x0
    r = sys.b - sys.A(x)
    rhat = r
    ones = torch.ones(B, dtype=x.dtype, device=x.device)
    active = norm(r) > sys.threshold
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    zeros = torch.zeros_like(r)
    state = _BiCGSTAB(x, r, zeros, zeros, ones, ones, ones, iters, torch.zeros_like(active), active)

    def step(s: _BiCGSTAB) -> _BiCGSTAB:
        rho_new = dot(rhat, s.r)
        ok1 = s.active & (rho_new != 0) & (s.omega != 0)
        beta = _safe_div(rho_new * s.alpha, s.rho * s.omega, ok1)
        p = torch.where(_col(ok1), s.r + _col(beta) * (s.p - _col(s.omega) * s.v), s.p)
        phat = sys.M(p)
        v = torch.where(_col(ok1), sys.A(phat), s.v)
        rv = dot(rhat, v)
        ok = ok1 & (rv != 0)
        alpha = torch.where(ok, _safe_div(rho_new, rv, ok), s.alpha)
        step_alpha = _col(torch.where(ok, alpha, torch.zeros_like(alpha)))
        sr = s.r - step_alpha * v
        half = ok & (norm(sr) <= sys.threshold)
        shat = sys.M(sr)
        t = sys.A(shat)
        tt = dot(t, t)
        full = ok & ~half & (tt != 0)
        omega_k = _safe_div(dot(t, sr), tt, full)
        x = s.x + step_alpha * phat + _col(omega_k) * shat
        r = torch.where(_col(ok), sr - _col(omega_k) * t, s.r)
        return _BiCGSTAB(
            x,
            r,
            p,
            v,
            torch.where(ok, rho_new, s.rho),
            alpha,
            torch.where(full, omega_k, s.omega),
            s.iters + ok.to(s.iters.dtype),
            s.broken | (s.active & ~ok),
            ok & ~half & (norm(r) > sys.threshold),
        )

    s, _ = iterate(step, state, active=lambda s: s.active, maxiter=maxiter, cadence=_cadence(sys))
    converged = (norm(s.r) <= sys.threshold) & ~s.broken
    return s.x, s.iters, converged, {"breakdown": s.broken}


# --------------------------------------------------------------------------------------------
# GMRES
# --------------------------------------------------------------------------------------------


def gmres(sys: FlatSystem, maxiter: int, restart: int):
    """Restarted GMRES with right preconditioning, per-system least squares and convergence.

    Arnoldi uses classical Gram-Schmidt applied twice (CGS2: as stable as modified GS, and
    made of batched matrix products). The small least-squares problem of each cycle is solved
    by QR; a (happy) breakdown leaves zero columns, whose unknowns are set to zero.
    ``maxiter`` counts Arnoldi steps (matvecs) in all cycles together.

    A cycle's length varies (it can end early), so the cycles run in this function's own loop
    rather than the driver's, with the driver's cadence: where values can be read, a cycle
    stops at the first step after which every running system's least-squares residual
    ``β |Q[0, j+1]|`` (from a complete QR of the ``(j+2, j+1)`` Hessenberg matrix, checked at
    the cadence) meets its target; the true residual is recomputed at the end of every cycle.
    """
    B, N = sys.shape
    x = sys.x0
    r = sys.b - sys.A(x)
    res = norm(r)
    active = res > sys.threshold
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    cadence = _cadence(sys)
    done = 0
    m = max(1, min(restart, N, maxiter))
    while done < maxiter:
        if cadence.inspect and not bool(active.any()):
            break
        k = min(m, maxiter - done)
        dx, k = _arnoldi_cycle(sys, r, res, active, k, cadence)
        x = torch.where(_col(active), x + dx, x)
        r = sys.b - sys.A(x)
        res = norm(r)
        iters = iters + k * active.to(iters.dtype)
        active = active & (res > sys.threshold)
        done += k
    converged = res <= sys.threshold
    return x, iters, converged, {}


def _arnoldi_cycle(sys: FlatSystem, r: Tensor, beta: Tensor, active: Tensor, k: int, cadence):
    """One GMRES cycle of at most ``k`` Arnoldi steps from residual ``r`` (norms ``beta``):
    the correction ``dx`` and the number of steps taken."""
    B = beta.shape[0]
    eps = torch.finfo(r.dtype).eps
    basis = [r * _col(_safe_div(torch.ones_like(beta), beta, beta > 0))]
    cols = []
    for j in range(k):
        w = sys.A(sys.M(basis[j]))
        wnorm = norm(w)
        V = torch.stack(basis, dim=1)  # (B, j+1, N)
        h = torch.einsum("bjn,bn->bj", V, w)
        w = w - torch.einsum("bjn,bj->bn", V, h)
        h2 = torch.einsum("bjn,bn->bj", V, w)
        w = w - torch.einsum("bjn,bj->bn", V, h2)
        h = h + h2
        hn = norm(w)
        ok = hn > 10 * eps * wnorm
        hn = torch.where(ok, hn, torch.zeros_like(hn))
        basis.append(w * _col(_safe_div(torch.ones_like(hn), hn, ok)))
        cols.append(torch.cat([h, _col(hn)], dim=1))
        if j + 1 < k and cadence.due(j + 1):
            estimate = beta * _lstsq_residual_fraction(cols)
            if not bool((active & (estimate > sys.threshold)).any()):
                k = j + 1
                break
    H = torch.stack([torch.nn.functional.pad(c, (0, k + 1 - c.shape[1])) for c in cols], 2)
    g = torch.cat([_col(beta), torch.zeros(B, k, dtype=r.dtype, device=r.device)], dim=1)
    y = _hessenberg_lstsq(H, g)  # H (B, k+1, k)
    return sys.M(torch.einsum("bjn,bj->bn", torch.stack(basis[:k], dim=1), y)), k


def _lstsq_residual_fraction(cols: list[Tensor]) -> Tensor:
    """``min_y ‖e₁ − H y‖`` for the ``(j+2, j+1)`` Hessenberg matrices whose columns are
    ``cols`` (column ``i`` has ``i+2`` entries): ``|Q[0, j+1]|`` of a complete QR of ``H``."""
    n = len(cols)
    # Values only (it decides when to stop): detached, since a complete QR of a tall matrix has
    # no derivative and the loop may run with autograd recording (higher-order derivatives).
    H = torch.stack([torch.nn.functional.pad(c.detach(), (0, n + 1 - c.shape[1])) for c in cols], 2)
    Q, _ = torch.linalg.qr(H, mode="complete")  # (B, n+1, n+1)
    return Q[:, 0, n].abs()


def _hessenberg_lstsq(H: Tensor, g: Tensor) -> Tensor:
    """``argmin_y ‖g − H y‖`` for a batch of ``(k+1, k)`` Hessenberg matrices, by QR.

    Columns after a breakdown are zero; their ``R`` diagonal is (numerically) zero and the
    corresponding unknowns are set to zero, which is the minimum-norm choice.
    """
    Q, R = torch.linalg.qr(H)  # Q (B, k+1, k), R (B, k, k)
    rhs = torch.einsum("bik,bi->bk", Q, g)
    diag = torch.diagonal(R, dim1=1, dim2=2)
    scale = diag.abs().amax(dim=1, keepdim=True)
    tiny = diag.abs() <= 100 * torch.finfo(H.dtype).eps * scale
    R = R + torch.diag_embed(torch.where(tiny, torch.ones_like(diag), torch.zeros_like(diag)))
    rhs = torch.where(tiny, torch.zeros_like(rhs), rhs)
    return torch.linalg.solve_triangular(R, rhs.unsqueeze(-1), upper=True).squeeze(-1)
