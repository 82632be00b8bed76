"""Linear solvers for the implicit-differentiation engine.

Every solver has the signature ``solve_X(matvec, b, *, init=None, ridge=None, tol=None,
atol=0.0, maxiter=None, M=None, batched=False, on_failure="warn", return_info=False)`` and
returns ``x`` (a pytree shaped like ``b``) with ``A x = b``, where ``A`` is the linear map
``matvec`` (a function from pytrees shaped like ``b`` to pytrees shaped like ``b``).

Conventions, shared by all solvers:

* ``ridge=r`` solves ``(A + r I) x = b`` (``solve_normal_cg``: ``(AᵀA + r I) x = Aᵀ b``).
* Convergence of system ``i``: ``‖b_i − A x_i‖ ≤ max(tol · ‖b_i‖, atol)``. ``tol=None`` means
  1e-10 for float64 and 1e-5 for lower precisions.
* ``batched=True``: dim 0 of every leaf of ``b`` indexes independent systems and ``matvec`` is
  block diagonal (output ``i`` depends on input ``i`` only). Step sizes, inner products and the
  convergence test are then per system: a converged system is frozen while the others go on.
* ``M`` is a preconditioner, a callable approximating ``A⁻¹`` (same pytree in and out).
* ``init`` is a warm start for the iterative solvers; the dense solvers ignore it and ``M``.
* No host synchronisation happens inside the iteration loops except a cheap convergence check
  (every iteration on the CPU, every 10 on an accelerator) that lets the loop stop early; under
  ``torch.func.vmap`` or ``torch.compile`` the loops run all ``maxiter`` iterations, masked.
* All operations are differentiable torch ops, but do not differentiate *through* these loops:
  the engine wraps each solve in an implicit linear solve whose derivatives are exact.
* Failure: a solve that misses its tolerance, meets non-positive curvature (CG) or breaks down
  warns with :class:`ConvergenceWarning` (``on_failure="warn"``, the default), raises
  :class:`ConvergenceError` (``"raise"``) or stays silent (``"ignore"``). The check needs to read
  values, so it is skipped under vmap and compile.
* ``return_info=True`` returns ``(x, SolveInfo)`` with per-system iterations, the final
  residual norm ``‖b − A x‖`` and a converged flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._errors import ConvergenceError, ConvergenceWarning, IndefiniteSystemError
from implicit_torch._tree import Raveler, tree_flatten, tree_map

__all__ = [
    "SolveInfo",
    "WarmStart",
    "auto_fused_budget",
    "get_solver",
    "solve_auto",
    "solve_bicgstab",
    "solve_cg",
    "solve_cholesky",
    "solve_formed",
    "solve_gmres",
    "solve_lu",
    "solve_neumann",
    "solve_normal_cg",
]

Tensor = torch.Tensor
Flat = Callable[[Tensor], Tensor]

# Direct solves form the (B, N, N) matrix with N matvecs. Up to this many unknowns per system
# (and this many matrix entries in all), "auto" prefers that: it is exact, indifferent to
# conditioning and symmetry, and N batched matvecs cost about what an iterative solve of a
# moderately conditioned system does.
AUTO_DENSE_MAX_N = 256
AUTO_DENSE_MAX_ENTRIES = 2**24
# Batched LU on the CPU with several threads fails for n >= 160 in recent torch releases
# (pytorch issue 142815: "Pivots given to lu_solve must all be greater or equal to 1", or a
# hang). Such solves run on one thread.
_CPU_BATCHED_LU_SAFE_N = 160

# The fused batched CG (implicit_torch.ops.batched_cg) on formed blocks. Thresholds measured on
# the 2-core CPU of benchmarks/RESULTS.md ("Fused batched CG" and "Choosing a dense solver"),
# torch 2.13, condition numbers 1e2-1e6:
# * Below 32 unknowns per system Cholesky is as fast as the fused CG (within ±20%) and exact,
#   so "auto" keeps Cholesky there.
# * A fused CG iteration costs about 1/n-th of a batched Cholesky solve for n <= 64 and about
#   1/100-th to 1/190-th for n in 128..256. "auto" therefore gives the fused CG a budget of
#   clamp(1.5 n, 32, 128) iterations and solves the systems that miss the tolerance within it
#   by Cholesky: a well-conditioned batch costs the fused CG alone, an ill-conditioned one at
#   most about twice a Cholesky solve.
# * solve="cg" never forms blocks to use the fused kernel: forming them takes N vmapped
#   matvecs, which on batched problems cost 1.4-20x a whole matrix-free CG solve
#   (benchmarks/batched_backward.py; vmap copies the unbatched operands once per column).
# Only devices with a compiled kernel qualify: the pure-PyTorch fallback is slower than
# Cholesky, and the CUDA kernel has no measurements yet (no GPU at hand when this was written).
AUTO_FUSED_MIN_N = 16
_FUSED_MEASURED_DEVICES = ("cpu",)


def auto_fused_budget(n: int) -> int:
    """Iterations the fused CG gets in "auto" before Cholesky takes over: clamp(1.5 n, 32, 128)."""
    return int(min(max(1.5 * n, 32), 128))


@dataclasses.dataclass
class SolveInfo:
    """Diagnostics of a linear solve (one entry per system when batched, 0-d otherwise).

    Attributes:
        iterations: iterations run (matvecs for CG/GMRES, double-matvec steps for BiCGSTAB,
            0 for the dense solvers), int64.
        residual_norm: ``‖b − A x‖`` of the returned ``x`` (with the ridge, when given).
        converged: whether the system met ``max(tol · ‖b‖, atol)``.
        indefinite: CG only: the system showed non-positive (or sign-changing) curvature.
        method: the solver that produced ``x`` ("cg", "gmres", ...).
    """

    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    indefinite: Tensor | None
    method: str


# --------------------------------------------------------------------------------------------
# The flat system shared by all solvers
# --------------------------------------------------------------------------------------------


class _FlatSystem:
    """``matvec``, ``b``, ``init`` and ``M`` in the solvers' ``(B, N)`` representation."""

    def __init__(self, matvec, b, init, ridge, M, batched, tol, atol):
        self.raveler = Raveler(b, batched, what="the right-hand side b")
        self.batched = batched
        self.b = self.raveler.ravel(b, "b")
        self._matvec = matvec
        self.ridge = ridge
        self._M = M
        self.init_given = init is not None
        self.x0 = (
            torch.zeros_like(self.b)
            if init is None
            else self.raveler.ravel(init, "init").detach().to(self.b.dtype)
        )
        if tol is None:
            tol = 1e-10 if self.b.dtype == torch.float64 else 1e-5
        if tol < 0 or atol < 0:
            raise ValueError(f"tol and atol must be non-negative, got tol={tol}, atol={atol}")
        self.tol, self.atol = tol, atol
        self.bnorm = _norm(self.b)
        self.inspect = _runtime.can_inspect_values(self.b)
        self.threshold = torch.clamp(tol * self.bnorm, min=atol)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.b.shape)

    def A(self, v: Tensor) -> Tensor:
        out = self.raveler.ravel(self._matvec(self.raveler.unravel(v)), "the output of matvec")
        return out if self.ridge is None else out + self.ridge * v

    def M(self, v: Tensor) -> Tensor:
        if self._M is None:
            return v
        return self.raveler.ravel(self._M(self.raveler.unravel(v)), "the output of M")

    def residual_norm(self, x: Tensor) -> Tensor:
        return _norm(self.b - self.A(x))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b, dim=1)


def _norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=1)


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(1)


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 0 elsewhere (never divides by zero, so no NaN leaks)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _all_done(active: Tensor, step: int, interval: int, inspect: bool) -> bool:
    return inspect and step % interval == 0 and not bool(active.any())


# --------------------------------------------------------------------------------------------
# Iterative solvers on flat systems. Each returns (x, iterations, converged, indefinite|None).
# --------------------------------------------------------------------------------------------


def _cg(sys: _FlatSystem, maxiter: int):
    """Preconditioned conjugate gradient, one step size per system.

    Works for symmetric definite systems of either sign (CG on ``−A`` has the same iterates).
    A curvature ``pᵀAp`` that is zero or changes sign marks the system indefinite and freezes it.

    Where values can be read every iteration (the CPU), plain unmasked steps are taken while
    every system is still running; the masked loop, which freezes finished systems, takes over
    once one converges or fails (or from the start on an accelerator and under vmap).
    """
    x = sys.x0
    r = sys.b - sys.A(x) if sys.init_given else sys.b  # skip a matvec for the zero start
    z = sys.M(r)
    p = z
    rz = _dot(r, z)
    sign = torch.zeros_like(rz)
    inspect, interval = sys.inspect, _runtime.check_interval(x.device)
    done = 0
    if inspect and interval == 1:
        done, x, r, z, p, rz, sign = _cg_while_all_active(sys, maxiter, x, r, z, p, rz)
    active = _norm(r) > sys.threshold
    iters = torch.full((sys.shape[0],), done, dtype=torch.int64, device=x.device)
    indefinite = torch.zeros_like(active)
    for k in range(done, maxiter):
        if _all_done(active, k, interval, inspect):
            break
        Ap = sys.A(p)
        pAp = _dot(p, Ap)
        sign = torch.where(sign == 0, torch.sign(pAp), sign)
        bad = active & ((pAp == 0) | (torch.sign(pAp) != sign))
        step = active & ~bad
        alpha = _col(_safe_div(rz, pAp, step))
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, Ap, value=-1)
        z = sys.M(r)
        rz_new = _dot(r, z)
        beta = _safe_div(rz_new, rz, step)
        p = torch.where(_col(step), torch.addcmul(z, _col(beta), p), p)
        rz = torch.where(step, rz_new, rz)
        iters = iters + step.to(iters.dtype)
        indefinite = indefinite | bad
        active = step & (_norm(r) > sys.threshold)
    converged = (_norm(r) <= sys.threshold) & ~indefinite
    return x, iters, converged, indefinite


def _neumann(sys: _FlatSystem, maxiter: int):
    """Richardson iteration ``x ← x + ω M(b − A x)`` with ``ω = ±1`` per system, the sign of
    ``⟨r₀, A r₀⟩``: from ``x = 0`` and without ``M``, the partial sums of the Neumann series
    of ``(ωA)⁻¹``. The sign makes a fixed-point condition converge whichever way it is
    written: ``A = I − ∂f/∂z`` (``F = z − f(z)``) or ``A = ∂f/∂z − I`` (``F = f(z) − z``, the
    engine's form for fixed points).

    Converges iff the spectral radius of ``I − ωMA`` is below 1 (for fixed points: ``f``
    contractive). A system whose residual grows 1e6-fold or becomes non-finite is frozen as
    diverged.
    """
    x = sys.x0
    r = sys.b - sys.A(x) if sys.init_given else sys.b
    r0 = _norm(r)
    omega = _col(torch.where(_dot(r, sys.A(r)) < 0, -1.0, 1.0).to(r.dtype))
    active = r0 > sys.threshold
    iters = torch.zeros(sys.shape[0], dtype=torch.int64, device=x.device)
    diverged = torch.zeros_like(active)
    inspect, interval = sys.inspect, _runtime.check_interval(x.device)
    for k in range(maxiter):
        if _all_done(active, k, interval, inspect):
            break
        x = torch.where(_col(active), x + omega * sys.M(r), x)
        r = torch.where(_col(active), sys.b - sys.A(x), r)
        rn = _norm(r)
        iters = iters + active.to(iters.dtype)
        bad = active & (~torch.isfinite(rn) | (rn > 1e6 * r0))
        diverged = diverged | bad
        active = active & ~bad & (rn > sys.threshold)
    converged = (_norm(r) <= sys.threshold) & ~diverged
    return x, iters, converged, diverged


def _cg_while_all_active(sys: _FlatSystem, maxiter: int, x, r, z, p, rz):
    """Unmasked CG steps for as long as every system is running (two host reads a step).

    Stops before a step whose curvature is non-positive or changes sign, and after a step that
    brings any system to convergence (or to NaN), leaving the rest to the masked loop.
    """
    unpreconditioned = sys._M is None
    rr = rz if unpreconditioned else _dot(r, r)
    thresh2 = sys.threshold**2
    sign = torch.zeros_like(rz)
    k = 0
    if not bool((rr > thresh2).all()):
        return k, x, r, z, p, rz, sign
    while k < maxiter:
        Ap = sys.A(p)
        pAp = _dot(p, Ap)
        if k == 0:
            sign = torch.sign(pAp)
        if bool((pAp * sign <= 0).any()):
            break
        alpha = _col(rz / pAp)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, Ap, value=-1)
        z = r if unpreconditioned else sys.M(r)
        rz_new = _dot(r, z)
        p = torch.addcmul(z, _col(rz_new / rz), p)
        rz = rz_new
        rr = rz if unpreconditioned else _dot(r, r)
        k += 1
        if not bool((rr > thresh2).all()):
            break
    return k, x, r, z, p, rz, sign


def _gmres(sys: _FlatSystem, maxiter: int, restart: int):
    """Restarted GMRES with right preconditioning, per-system least squares and convergence.

    Arnoldi uses classical Gram-Schmidt applied twice (CGS2: as stable as modified GS, and
    made of batched matrix products). The small least-squares problem of each cycle is solved
    by QR; a (happy) breakdown leaves zero columns, whose unknowns are set to zero.
    ``maxiter`` counts Arnoldi steps (matvecs) in all cycles together.

    Where values can be read, a cycle also stops early, at the first step after which every
    running system's least-squares residual ``β |Q[0, j+1]|`` (from a complete QR of the
    ``(j+2, j+1)`` Hessenberg matrix, checked every ``check_interval`` steps) meets its
    target; the true residual is recomputed at the end of every cycle either way.
    """
    B, N = sys.shape
    x = sys.x0
    r = sys.b - sys.A(x)
    res = _norm(r)
    active = res > sys.threshold
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    inspect, interval = sys.inspect, _runtime.check_interval(x.device)
    done = 0
    m = max(1, min(restart, N, maxiter))
    eps = torch.finfo(x.dtype).eps
    while done < maxiter:
        if inspect and not bool(active.any()):
            break
        k = min(m, maxiter - done)
        beta = res
        basis = [r * _col(_safe_div(torch.ones_like(beta), beta, beta > 0))]
        cols = []
        for j in range(k):
            w = sys.A(sys.M(basis[j]))
            wnorm = _norm(w)
            V = torch.stack(basis, dim=1)  # (B, j+1, N)
            h = torch.einsum("bjn,bn->bj", V, w)
            w = w - torch.einsum("bjn,bj->bn", V, h)
            h2 = torch.einsum("bjn,bn->bj", V, w)
            w = w - torch.einsum("bjn,bj->bn", V, h2)
            h = h + h2
            hn = _norm(w)
            ok = hn > 10 * eps * wnorm
            hn = torch.where(ok, hn, torch.zeros_like(hn))
            basis.append(w * _col(_safe_div(torch.ones_like(hn), hn, ok)))
            cols.append(torch.cat([h, _col(hn)], dim=1))
            if inspect and j + 1 < k and (j + 1) % interval == 0:
                estimate = beta * _lstsq_residual_fraction(cols)
                if not bool((active & (estimate > sys.threshold)).any()):
                    k = j + 1
                    break
        H = torch.stack([torch.nn.functional.pad(c, (0, k + 1 - c.shape[1])) for c in cols], 2)
        g = torch.cat([_col(beta), torch.zeros(B, k, dtype=x.dtype, device=x.device)], dim=1)
        y = _hessenberg_lstsq(H, g)  # H (B, k+1, k)
        dx = sys.M(torch.einsum("bjn,bj->bn", torch.stack(basis[:k], dim=1), y))
        x = torch.where(_col(active), x + dx, x)
        r = sys.b - sys.A(x)
        res = _norm(r)
        iters = iters + k * active.to(iters.dtype)
        active = active & (res > sys.threshold)
        done += k
    converged = res <= sys.threshold
    return x, iters, converged, None


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


def _bicgstab(sys: _FlatSystem, maxiter: int):
    """Preconditioned BiCGSTAB (van der Vorst, 1992), per-system scalars and convergence.

    A breakdown (``r̂ᵀr = 0`` or ``r̂ᵀv = 0`` before convergence) freezes the system and
    reports it as not converged.
    """
    B, _ = sys.shape
    x = sys.x0
    r = sys.b - sys.A(x)
    rhat = r
    ones = torch.ones(B, dtype=x.dtype, device=x.device)
    rho, alpha, omega = ones, ones, ones
    v = torch.zeros_like(r)
    p = torch.zeros_like(r)
    active = _norm(r) > sys.threshold
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    broken = torch.zeros_like(active)
    inspect, interval = sys.inspect, _runtime.check_interval(x.device)
    for k in range(maxiter):
        if _all_done(active, k, interval, inspect):
            break
        rho_new = _dot(rhat, r)
        ok1 = active & (rho_new != 0) & (omega != 0)
        beta = _safe_div(rho_new * alpha, rho * omega, ok1)
        p = torch.where(_col(ok1), r + _col(beta) * (p - _col(omega) * v), p)
        phat = sys.M(p)
        v = torch.where(_col(ok1), sys.A(phat), v)
        rv = _dot(rhat, v)
        ok = ok1 & (rv != 0)
        alpha = torch.where(ok, _safe_div(rho_new, rv, ok), alpha)
        s = r - _col(torch.where(ok, alpha, torch.zeros_like(alpha))) * v
        half = ok & (_norm(s) <= sys.threshold)
        shat = sys.M(s)
        t = sys.A(shat)
        tt = _dot(t, t)
        full = ok & ~half & (tt != 0)
        omega_k = _safe_div(_dot(t, s), tt, full)
        x = x + _col(torch.where(ok, alpha, torch.zeros_like(alpha))) * phat + _col(omega_k) * shat
        r = torch.where(_col(ok), s - _col(omega_k) * t, r)
        omega = torch.where(full, omega_k, omega)
        rho = torch.where(ok, rho_new, rho)
        iters = iters + ok.to(iters.dtype)
        broken = broken | (active & ~ok)
        active = ok & ~half & (_norm(r) > sys.threshold)
    converged = (_norm(r) <= sys.threshold) & ~broken
    return x, iters, converged, None


# --------------------------------------------------------------------------------------------
# Dense solvers
# --------------------------------------------------------------------------------------------


def materialize(
    matvec_flat: Flat, batch: int, n: int, dtype, device, loop_fallback: bool = True
) -> Tensor | None:
    """The ``(B, N, N)`` blocks of a block-diagonal flat operator, from N (batched) matvecs.

    Column ``j`` of every block is ``matvec(e_j)`` with ``e_j`` repeated for all systems. The
    matvecs are vectorised with ``torch.func.vmap``; a matvec that vmap cannot handle is called
    once per column instead, or, with ``loop_fallback=False``, ``None`` is returned.
    """
    eye = torch.eye(n, dtype=dtype, device=device)

    def column(e: Tensor) -> Tensor:
        return matvec_flat(e.expand(batch, n))

    try:
        cols = torch.func.vmap(column)(eye)  # (N, B, N)
    except Exception:  # not vmappable: loop instead (a real error re-raises there)
        if not loop_fallback:
            return None
        cols = torch.stack([column(eye[j]) for j in range(n)])
    return cols.permute(1, 2, 0)


@functools.lru_cache(maxsize=32)
def _symmetry_probes(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Two fixed, generic probe vectors ``(n, 2)`` (cached: built once per size; never an
    inference tensor, so that a cached copy can also be used where autograd records)."""
    with torch.inference_mode(False), torch.no_grad():
        idx = torch.arange(n, dtype=dtype, device=device)
        return torch.stack([torch.sin(1.7 * idx + 0.3), torch.cos(2.3 * idx + 1.1)], dim=1)


def _formed_is_symmetric(A: Tensor) -> bool:
    """``vᵀ(A w) = wᵀ(A v)`` per block, for two fixed pseudo-random probe vectors.

    One pass over ``A`` (a ``(B N, N) × (N, 2)`` product), where comparing ``A`` with
    ``Aᵀ`` entry by entry reads ``A`` transposed and cost three fused CG solves in
    benchmarks/batched_cg.py. The tolerance, ``1e3·eps`` relative, admits the round-off
    asymmetry of blocks formed by autodiff and nothing a solver would notice.
    """
    B, N, _ = A.shape
    probes = _symmetry_probes(N, A.dtype, A.device)
    AP = (A.reshape(B * N, N) @ probes).reshape(B, N, 2)  # A v, A w: one GEMM for all blocks
    C = AP.mT @ probes  # (B, 2, 2): C[i, 0, 1] = (A v)ᵀ w, C[i, 1, 0] = (A w)ᵀ v
    scale = torch.linalg.vector_norm(AP, dim=(1, 2)) * torch.linalg.vector_norm(probes)
    eps = torch.finfo(A.dtype).eps
    return bool(((C[:, 0, 1] - C[:, 1, 0]).abs() <= 1e3 * eps * scale).all())


def _fused_kernel_serves(sys: _FlatSystem) -> bool:
    """Whether the compiled fused CG runs, measured, on this system's device (and values can be
    read, which the fallback to Cholesky needs)."""
    from implicit_torch import ops  # late: ops loads the compiled extension

    device = sys.b.device
    return (
        sys.inspect and device.type in _FUSED_MEASURED_DEVICES and ops.extension_available(device)
    )


# The fused CG stops on its recurrence residual; the true residual ‖b − A x‖ it returns lies a
# few times above that in float32 (benchmarks/RESULTS.md: up to 6x at rtol 1e-6), where a
# Cholesky solve is no more accurate. Such systems count as solved; only a true residual more
# than this factor above the target (budget exhausted, breakdown, NaN) sends a system on to
# Cholesky.
_FUSED_ROUNDOFF_SLACK = 10.0


def _fused_cg(sys: _FlatSystem, A: Tensor, maxiter: int):
    """The fused batched CG on formed symmetric blocks: ``(x, iterations, solved)``, with
    ``solved`` judged on the true residual the kernel returns (see the slack above)."""
    from implicit_torch import ops  # noqa: F401  (loads the operator)

    # The operator itself (the inputs are already checked and the threshold known, so the
    # public wrapper's checks and diagnostics would be repeated work).
    x, iterations, res = torch.ops.implicit_torch.batched_cg(
        A, sys.b, sys.x0 if sys.init_given else None, sys.tol, sys.atol, maxiter, False
    )
    solved = torch.isfinite(res) & (res <= _FUSED_ROUNDOFF_SLACK * sys.threshold)
    return x, iterations, solved


def _cholesky_or_lu(A: Tensor, b: Tensor) -> tuple[Tensor, str]:
    """Cholesky for symmetric positive-definite blocks, LU when any block is not."""
    L, info = torch.linalg.cholesky_ex(A)
    if not bool(info.any()):
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1), "cholesky"
    return lu_solve_dense(A, b), "lu"


def solve_formed(A: Tensor, b: Tensor, *, tol: float | None = None, atol: float = 0.0):
    """``solve="auto"``'s choice for formed blocks: solve ``A[i] x[i] = b[i]``.

    Symmetric blocks of at least ``AUTO_FUSED_MIN_N`` unknowns on a device with a compiled,
    measured fused kernel go to :func:`implicit_torch.ops.batched_cg` with a budget of
    :func:`auto_fused_budget` iterations; the systems that miss ``max(tol ‖b_i‖, atol)`` within
    it, and every other symmetric case, go to Cholesky; blocks that are not symmetric positive
    definite go to LU.

    Args:
        A: ``(B, N, N)`` float blocks.
        b: ``(B, N)``.
        tol, atol: as for the solvers (``tol=None``: 1e-10 in float64, 1e-5 otherwise).

    Returns:
        ``(x, method)`` with ``x`` of shape ``(B, N)`` and ``method`` one of ``"batched_cg"``,
        ``"batched_cg+cholesky"``, ``"cholesky"``, ``"lu"``.
    """
    sys = _FlatSystem(
        lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), b, None, None, None, True, tol, atol
    )
    return _solve_formed(sys, A)


def _solve_formed(sys: _FlatSystem, A: Tensor) -> tuple[Tensor, str]:
    N = sys.shape[1]
    if not (sys.inspect and _formed_is_symmetric(A)):
        return lu_solve_dense(A, sys.b), "lu"
    if N < AUTO_FUSED_MIN_N or not _fused_kernel_serves(sys):
        return _cholesky_or_lu(A, sys.b)
    x, _, converged = _fused_cg(sys, A, auto_fused_budget(N))
    if bool(converged.all()):
        return x, "batched_cg"
    missed = (~converged).nonzero().squeeze(-1)
    x_missed, method = _cholesky_or_lu(A[missed], sys.b[missed])
    x = x.index_copy(0, missed, x_missed)
    return x, f"batched_cg+{method}"


@contextlib.contextmanager
def _single_thread_if_needed(A: Tensor):
    """Guard for pytorch issue 142815 (batched CPU LU with several threads, n >= 160)."""
    needs = (
        A.device.type == "cpu"
        and A.dim() == 3
        and A.shape[0] > 1
        and A.shape[-1] >= _CPU_BATCHED_LU_SAFE_N
        and torch.get_num_threads() > 1
    )
    if not needs:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lu_solve_dense(A: Tensor, b: Tensor) -> Tensor:
    """``A⁻¹ b`` for ``A`` (B, N, N) and ``b`` (B, N) by LU, with the CPU guard above."""
    with _single_thread_if_needed(A):
        return torch.linalg.solve(A, b)


def _is_symmetric(A: Tensor) -> bool:
    scale = A.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(A.dtype).tiny)
    asym = (A - A.transpose(1, 2)).abs().amax(dim=(1, 2))
    return bool((asym <= 1e3 * torch.finfo(A.dtype).eps * scale).all())


def _dense(sys: _FlatSystem, method: str):
    """Form the blocks, then Cholesky or LU. Returns (x, method actually used, note)."""
    B, N = sys.shape
    A = materialize(sys.A, B, N, sys.b.dtype, sys.b.device)
    note = None
    if method == "cholesky":
        if not sys.inspect:
            # Symmetry and definiteness cannot be checked here: LU is right in every case.
            return lu_solve_dense(A, sys.b), "lu", None
        if _is_symmetric(A):
            L, info = torch.linalg.cholesky_ex(A)
            if not bool(info.any()):
                x = torch.cholesky_solve(sys.b.unsqueeze(-1), L).squeeze(-1)
                return x, "cholesky", None
            note = "the matrix is not positive definite"
        else:
            note = "the matrix is not symmetric"
    return lu_solve_dense(A, sys.b), "lu", note


# --------------------------------------------------------------------------------------------
# Public solvers
# --------------------------------------------------------------------------------------------


def _default_maxiter(sys: _FlatSystem, maxiter: int | None) -> int:
    if maxiter is None:
        return 10 * sys.shape[1]
    if maxiter < 0:
        raise ValueError(f"maxiter must be non-negative, got {maxiter}")
    return int(maxiter)


def _make_system(matvec, b, init, ridge, M, batched, tol, atol) -> _FlatSystem:
    if not callable(matvec):
        raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
    return _FlatSystem(matvec, b, init, ridge, M, batched, tol, atol)


def _finish(
    sys: _FlatSystem,
    x: Tensor,
    method: str,
    iters,
    converged,
    indefinite,
    on_failure: str,
    return_info: bool,
    note: str | None = None,
):
    """Check the outcome, then return ``x`` as a pytree (and the info when asked)."""
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    need_residual = return_info or (on_failure != "ignore" and sys.inspect)
    residual = sys.residual_norm(x) if need_residual else None
    if residual is not None:
        converged = converged & torch.isfinite(residual)
    if on_failure != "ignore" and sys.inspect:
        _report(sys, method, iters, converged, indefinite, residual, on_failure, note)
    out = sys.raveler.unravel(x)
    if not return_info:
        return out
    squeeze = (lambda t: t) if sys.batched else (lambda t: t.reshape(()))
    info = SolveInfo(
        iterations=squeeze(iters),
        residual_norm=squeeze(residual),
        converged=squeeze(converged),
        indefinite=None if indefinite is None else squeeze(indefinite),
        method=method,
    )
    return out, info


def _report(sys, method, iters, converged, indefinite, residual, on_failure, note):
    if note is not None:
        warnings.warn(
            f"implicit_torch: solve_cholesky fell back to LU: {note}",
            ConvergenceWarning,
            stacklevel=4,
        )
    bad = ~converged
    if not bool(bad.any()):
        return
    B = sys.shape[0]
    worst = int(torch.argmax(torch.where(bad, residual, torch.full_like(residual, -1.0))))
    where = f"{int(bad.sum())} of {B} systems" if sys.batched else "the system"
    if indefinite is not None and bool(indefinite.any()):
        msg = (
            f"implicit_torch: solve_{method} met non-positive or sign-changing curvature "
            f"pᵀAp in {where}: the system is not symmetric definite, so conjugate gradient "
            f"does not apply. Use solve='gmres', 'bicgstab', 'lu' or 'auto'."
        )
        error: type[Exception] = IndefiniteSystemError
    else:
        msg = (
            f"implicit_torch: solve_{method} did not converge for {where} after "
            f"{int(iters.max())} iterations: residual ‖b − Ax‖ = {float(residual[worst]):.3e}"
            f" > target {float(sys.threshold[worst]):.3e} (tol={sys.tol:g} · ‖b‖ = "
            f"{float(sys.bnorm[worst]):.3e}, atol={sys.atol:g}). The result, and any "
            f"gradient computed from it, is inaccurate: raise maxiter, loosen tol, add a "
            f"preconditioner M, or use another solver."
        )
        error = ConvergenceError
    if on_failure == "raise":
        raise error(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def solve_cg(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` for symmetric definite ``A`` by (preconditioned) conjugate gradient.

    Matrix-free: ``A`` is only applied through ``matvec``. ``maxiter`` defaults to ``10 N``.
    Non-positive or sign-changing curvature is reported as an indefinite system. See the module
    docstring for the shared arguments.
    """
    sys = _make_system(matvec, b, init, ridge, M, batched, tol, atol)
    maxiter = _default_maxiter(sys, maxiter)
    x, iters, conv, indef = _cg(sys, maxiter)
    return _finish(sys, x, "cg", iters, conv, indef, on_failure, return_info)


def solve_neumann(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` by Richardson iteration ``x ← x ± M(b − A x)`` (the truncated Neumann
    series ``Σₖ (I ∓ A)ᵏ (±b)`` without ``M``; the sign, per system, is that of ``⟨b, A b⟩``).

    For fixed-point systems ``A = ±(I − ∂f/∂z)`` with a contractive ``f`` (deep equilibrium
    models): one matvec per iteration, no inner products, convergence at the contraction rate.
    It diverges when the spectral radius of ``∂f/∂z`` is 1 or more; a residual that grows
    1e6-fold is reported as divergence. ``maxiter`` defaults to ``10 N``.
    """
    sys = _make_system(matvec, b, init, ridge, M, batched, tol, atol)
    x, iters, conv, diverged = _neumann(sys, _default_maxiter(sys, maxiter))
    if on_failure != "ignore" and sys.inspect and bool(diverged.any()):
        msg = (
            "implicit_torch: solve_neumann diverged: the residual grew 1e6-fold, so the "
            "spectral radius of I − A is 1 or more (the fixed-point map is not contractive). "
            "Use solve='gmres' or 'lu'."
        )
        if on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        on_failure = "ignore"  # reported once, above
    return _finish(sys, x, "neumann", iters, conv, None, on_failure, return_info)


def solve_normal_cg(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` for any nonsingular ``A`` by CG on ``(AᵀA + ridge I) x = Aᵀ b``.

    ``Aᵀ`` is obtained as the vector-Jacobian product of the (linear) ``matvec``. The normal
    equations square the condition number: prefer GMRES, BiCGSTAB or LU for badly conditioned
    non-symmetric systems. ``tol`` applies to the normal equations; the reported residual is
    ``‖b − A x‖``. ``M`` preconditions the normal equations.
    """
    base = _make_system(matvec, b, init, None, None, batched, tol, atol)
    _, vjp = torch.func.vjp(base.A, torch.zeros_like(base.b))

    def normal_matvec(v):
        return base.raveler.unravel(vjp(base.A(base.raveler.ravel(v)))[0])

    rhs = base.raveler.unravel(vjp(base.b)[0])
    sys = _make_system(normal_matvec, rhs, init, ridge, M, batched, base.tol, base.atol)
    x, iters, conv, indef = _cg(sys, _default_maxiter(sys, maxiter))
    return _finish(base, x, "normal_cg", iters, conv, indef, on_failure, return_info)


def solve_gmres(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
    restart=20,
):
    """Solve ``A x = b`` for any nonsingular ``A`` by restarted GMRES (Saad & Schultz, 1986).

    ``restart`` is the Krylov dimension of a cycle; ``maxiter`` (default ``10 N``) counts
    Arnoldi steps over all cycles. ``M`` is applied as a right preconditioner, so the
    convergence test is on the true residual.
    """
    sys = _make_system(matvec, b, init, ridge, M, batched, tol, atol)
    x, iters, conv, _ = _gmres(sys, _default_maxiter(sys, maxiter), restart)
    return _finish(sys, x, "gmres", iters, conv, None, on_failure, return_info)


def solve_bicgstab(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` for any nonsingular ``A`` by BiCGSTAB (two matvecs per iteration)."""
    sys = _make_system(matvec, b, init, ridge, M, batched, tol, atol)
    x, iters, conv, _ = _bicgstab(sys, _default_maxiter(sys, maxiter))
    return _finish(sys, x, "bicgstab", iters, conv, None, on_failure, return_info)


def _dense_public(method, matvec, b, init, ridge, tol, atol, batched, on_failure, return_info):
    sys = _make_system(matvec, b, None, ridge, None, batched, tol, atol)
    x, used, note = _dense(sys, method)
    iters = torch.zeros(sys.shape[0], dtype=torch.int64, device=x.device)
    conv = torch.isfinite(x).all(dim=1)
    return _finish(sys, x, used, iters, conv, None, on_failure, return_info, note)


def solve_lu(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` by forming ``A`` (``N`` matvecs; per ``N × N`` block when batched)
    and an LU factorisation with partial pivoting. ``init``, ``maxiter`` and ``M`` are unused;
    ``tol``/``atol`` only judge the reported residual."""
    return _dense_public("lu", matvec, b, init, ridge, tol, atol, batched, on_failure, return_info)


def solve_cholesky(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Solve ``A x = b`` for symmetric positive-definite ``A`` by forming it and a Cholesky
    factorisation. A formed matrix that is not symmetric or not positive definite is solved by
    LU instead, with a :class:`ConvergenceWarning` saying so (under vmap, where that cannot be
    checked, LU is always used)."""
    return _dense_public(
        "cholesky", matvec, b, init, ridge, tol, atol, batched, on_failure, return_info
    )


def _probe_symmetric(sys: _FlatSystem) -> bool:
    """``vᵀ(A w) = wᵀ(A v)`` for two fixed pseudo-random vectors (two matvecs)."""
    B, N = sys.shape
    idx = torch.arange(N, dtype=sys.b.dtype, device=sys.b.device)
    v = torch.sin(1.7 * idx + 0.3).expand(B, N)
    w = torch.cos(2.3 * idx + 1.1).expand(B, N)
    Av, Aw = sys.A(v), sys.A(w)
    s1, s2 = _dot(v, Aw), _dot(w, Av)
    scale = _norm(v) * _norm(Aw) + _norm(w) * _norm(Av)
    return bool(((s1 - s2).abs() <= 1e-6 * scale).all())


def solve_auto(
    matvec,
    b,
    *,
    init=None,
    ridge=None,
    tol=None,
    atol=0.0,
    maxiter=None,
    M=None,
    batched=False,
    on_failure="warn",
    return_info=False,
):
    """Choose a solver by size, structure and device, then solve ``A x = b``.

    "Small" means at most ``AUTO_DENSE_MAX_N`` = 256 unknowns per system and at most 2**24
    matrix entries in all; "forming" a small system takes N vmapped matvecs and then
    :func:`solve_formed` solves the blocks (symmetric ones of 32 or more unknowns by the fused
    batched CG where its compiled kernel runs, with Cholesky for the systems it leaves
    unconverged within its iteration budget; other symmetric positive-definite blocks by
    Cholesky; the rest by LU).

    * A single small system (``batched=False``) is formed and solved directly: exact, and
      indifferent to conditioning and symmetry.
    * Batched and large systems are probed for symmetry with two matvecs (``vᵀAw = wᵀAv``).
      A symmetric one goes to matrix-free CG: forming B blocks by vmap costs more than a whole
      CG solve on batched problems (vmap copies unbatched operands once per column;
      1.6-19x slower than CG in benchmarks/batched_backward.py). If CG meets indefiniteness or
      has not converged after ``2 N`` iterations, a small system is formed and solved
      directly instead, a large one is handed to GMRES from CG's iterate.
    * A non-symmetric batched system is formed when small (LU), GMRES otherwise.
    * Under ``torch.func.vmap`` values cannot be inspected: small systems are formed (LU),
      larger ones go to GMRES.
    """
    sys = _make_system(matvec, b, init, ridge, M, batched, tol, atol)
    B, N = sys.shape
    inspect = sys.inspect
    small = N <= AUTO_DENSE_MAX_N and B * N * N <= AUTO_DENSE_MAX_ENTRIES

    def formed(prefix: str = ""):
        A = materialize(sys.A, B, N, sys.b.dtype, sys.b.device)
        x, method = _solve_formed(sys, A)
        return _dense_finish(sys, x, prefix + method, on_failure, return_info)

    if small and (not batched or not inspect):
        return formed()
    iters_cap = _default_maxiter(sys, maxiter)
    if inspect and _probe_symmetric(sys):
        x, iters, conv, indef = _cg(sys, min(iters_cap, 2 * N) if small else iters_cap)
        if bool(conv.all()):
            return _finish(sys, x, "cg", iters, conv, indef, on_failure, return_info)
        if small:
            return formed("cg+")
        sys.x0, sys.init_given = x, True
    elif small:
        return formed()
    x, iters, conv, _ = _gmres(sys, iters_cap, 20)
    return _finish(sys, x, "gmres", iters, conv, None, on_failure, return_info)


def _dense_finish(sys, x, method, on_failure, return_info):
    iters = torch.zeros(sys.shape[0], dtype=torch.int64, device=x.device)
    conv = torch.isfinite(x).all(dim=1)
    return _finish(sys, x, method, iters, conv, None, on_failure, return_info)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

SOLVERS: dict[str, Callable[..., Any]] = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    "neumann": solve_neumann,
    "gmres": solve_gmres,
    "bicgstab": solve_bicgstab,
    "lu": solve_lu,
    "cholesky": solve_cholesky,
    "auto": solve_auto,
}
_BUILTIN = frozenset(SOLVERS.values())


def get_solver(solve: str | Callable[..., Any]) -> Callable[..., Any]:
    """The solver callable for a name in ``SOLVERS`` or a user callable ``solve(matvec, b)``."""
    if isinstance(solve, str):
        try:
            return SOLVERS[solve]
        except KeyError:
            raise ValueError(
                f"unknown solve={solve!r}; choose one of {sorted(SOLVERS)} or pass "
                f"a callable solve(matvec, b) -> x"
            ) from None
    if not callable(solve):
        raise TypeError(
            f"solve must be a name or a callable solve(matvec, b), got {type(solve).__name__}"
        )
    return solve


class WarmStart:
    """A built-in solver that starts each solve from its previous solution.

    In a training loop the systems of consecutive steps differ little (the parameters move a
    little), so the previous step's backward adjoint is a good initial guess for the next:
    ``solve=WarmStart("gmres")`` in a layer or ``custom_root`` feeds it as ``init`` whenever
    the right-hand side has the same shapes and dtypes. ``iterations`` records the iterations
    of every solve (the most of any system), to measure what the warm start saves; ``reset()``
    forgets the stored solution. Inside ``torch.func`` transforms nothing is stored or reused.

    Args:
        solve: a built-in solver's name or function (possibly a ``functools.partial``), which
            must accept ``init``.
    """

    def __init__(self, solve: str | Callable[..., Any] = "gmres"):
        self.solve = get_solver(solve)
        if not is_builtin(self.solve):
            raise TypeError("WarmStart wraps a built-in solver (a name, or one of solve_*)")
        self.last: Any = None
        self.iterations: list[int] = []

    def reset(self) -> None:
        self.last = None

    def _fits(self, b) -> bool:
        if self.last is None:
            return False
        leaves_b, spec_b = tree_flatten(b)
        leaves_l, spec_l = tree_flatten(self.last)
        return spec_b == spec_l and all(
            x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            for x, y in zip(leaves_b, leaves_l)
        )

    def __call__(self, matvec, b, *, batched: bool = False, **kwargs):
        if _runtime.under_functorch():
            return self.solve(matvec, b, batched=batched, **kwargs)
        init = self.last if self._fits(b) else None
        x, info = self.solve(matvec, b, init=init, batched=batched, return_info=True, **kwargs)
        # A solution with NaN or Inf (a failed solve, already reported) is no guess to start from.
        finite = all(bool(torch.isfinite(t).all()) for t in tree_flatten(x)[0])
        self.last = tree_map(lambda t: t.detach(), x) if finite else None
        self.iterations.append(int(info.iterations.max()))
        return x


def _base(solve: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(solve, (functools.partial, WarmStart)):
        solve = solve.func if isinstance(solve, functools.partial) else solve.solve
    return solve


def is_builtin(solve: Callable[..., Any]) -> bool:
    """True for the solvers of this module, also behind ``functools.partial``."""
    return _base(solve) in _BUILTIN


def only_applies_matvec(solve: Callable[..., Any]) -> bool:
    """True for the solvers that only evaluate ``matvec`` (no vmap over it, no transpose).

    Those may be given a value-only matvec, which is cheaper; the dense solvers vmap it and
    normal CG transposes it, and a user callable may do either.
    """
    return _base(solve) in (solve_cg, solve_gmres, solve_bicgstab, solve_neumann)


def call_solver(solve: Callable[..., Any], matvec, b, *, batched: bool):
    """``solve(matvec, b)``, telling a built-in solver whether the system is batched.

    A user callable sees a batched system as one block-diagonal system over all problems.
    """
    if is_builtin(solve):
        return solve(matvec, b, batched=batched)
    return solve(matvec, b)
